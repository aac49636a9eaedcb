//! Assembling the model's parameters on the device, whatever the checkpoint format: each
//! reader (safetensors, bundle chunks, the converter's GGUF path) hands tensors over in the
//! model's layout as it reads them, and the model takes them out once all have arrived. A
//! layer's projections are fused here into the two matmuls the model runs ([`FusedLinear`]).

use std::collections::BTreeMap;

use burn::tensor::{Device, Tensor, TensorData};

use super::names::{LayerParam, Slot};
use crate::config::PhiConfig;
use crate::error::{Error, Result};
use crate::kernels::Q4Weight;
use crate::quant::{Q4Matrix, PLACEMENT_COLS};

/// One of the two matmuls a layer runs (see [`crate::model`]): `rows × cols`, made of parts
/// placed at `(row, col)`, zeros elsewhere. Parts side by side along the rows (outputs) compute
/// their projections at once; parts side by side along the columns (inputs) sum their
/// projections of the inputs laid side by side the same way. 4-bit parts start on
/// [`PLACEMENT_COLS`] columns.
pub struct FusedLinear {
    pub rows: usize,
    pub cols: usize,
    pub parts: Vec<FusedPart>,
}

/// A projection inside a [`FusedLinear`]: the transformers tensors it comes from, and where.
#[derive(Debug, Clone, Copy)]
pub struct FusedPart {
    pub weight: LayerParam,
    pub bias: LayerParam,
    pub row: usize,
    pub col: usize,
}

impl FusedLinear {
    /// A layer's two matmuls: `fc1_qkv`, transformers' `mlp.fc1` and `self_attn.q_proj`,
    /// `k_proj`, `v_proj` stacked along the outputs (the MLP part [`mlp_width`] rows); and
    /// `fc2_dense`, `mlp.fc2` and `self_attn.dense` side by side along the inputs.
    pub fn of_layer(config: &PhiConfig) -> [FusedLinear; 2] {
        use LayerParam::*;
        let hidden = config.hidden_size;
        let mlp = mlp_width(config);
        let part = |weight, bias, row, col| FusedPart {
            weight,
            bias,
            row,
            col,
        };
        [
            FusedLinear {
                rows: mlp + 3 * hidden,
                cols: hidden,
                parts: vec![
                    part(Fc1Weight, Fc1Bias, 0, 0),
                    part(QProjWeight, QProjBias, mlp, 0),
                    part(KProjWeight, KProjBias, mlp + hidden, 0),
                    part(VProjWeight, VProjBias, mlp + 2 * hidden, 0),
                ],
            },
            FusedLinear {
                rows: hidden,
                cols: mlp + hidden,
                parts: vec![
                    part(Fc2Weight, Fc2Bias, 0, 0),
                    part(DenseWeight, DenseBias, 0, mlp),
                ],
            },
        ]
    }
}

/// The MLP's width rounded up to whole [`PLACEMENT_COLS`], so that the attention part after it
/// in a fused layer starts on 4-bit blocks' boundaries (Phi-2's 10240 already does).
pub fn mlp_width(config: &PhiConfig) -> usize {
    config.intermediate_size.next_multiple_of(PLACEMENT_COLS)
}

/// A weight matrix where the model computes with it.
#[allow(clippy::large_enum_variant)] // a few per model, not worth a box
pub enum Matrix {
    /// In the model's f32 layout: a linear weight `[in, out]`, the embedding `[vocab, hidden]`.
    F32(Tensor<2>),
    /// Packed 4-bit, `[out, in]` (the embedding `[vocab, hidden]`).
    Q4(Q4Weight),
}

/// A tensor in host memory, in the layout the model uses (linear weights `[in, out]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A parameter where the model will use it.
#[allow(clippy::large_enum_variant)] // a few per model, not worth a box
enum Stored {
    F32(Tensor<1>),
    Q4(Q4Weight),
    /// A 4-bit linear weight uploaded as part of its layer's fused weight.
    Fused,
}

/// Collects the model's parameters on the device, shard by shard (or chunk by chunk).
///
/// A layer's 4-bit projections are fused into the two weights the model runs
/// ([`FusedLinear`]) here, on the host, and uploaded once: each is held until the rest of its
/// fused weight has arrived (a bundle stores a layer's tensors together: at most a layer's
/// ~44 MB for Phi-2, and a bundle's manifest must list its layers in order). Fusing them on
/// the device instead copied every weight once more there, a large share of a cached load on
/// a CPU-emulated adapter (BENCHMARKS.md). Their biases are summed into one here too, and kept
/// on the host until then (a few KB): summing them on the device cost seconds in Chromium.
/// A layer mixing 4-bit and f32 projections is assembled in f32 ([`Weights::take_fused`]): its 4-bit parts
/// are uploaded alone as soon as an f32 sibling shows.
pub struct WeightAssembler {
    config: PhiConfig,
    device: Device,
    uploaded: BTreeMap<Slot, Stored>,
    /// A layer's fused weights, from the config.
    layout: [FusedLinear; 2],
    /// 4-bit projections waiting for the rest of their fused weight.
    pending: BTreeMap<Slot, Q4Matrix>,
    /// The biases of fused weights' parts, until their fused weight is made.
    biases: BTreeMap<Slot, Vec<f32>>,
    /// Fused 4-bit weights and their biases on the device, by the slot of their first part.
    fused: BTreeMap<Slot, (Q4Weight, Tensor<1>)>,
}

impl WeightAssembler {
    pub fn new(config: PhiConfig, device: Device) -> Self {
        WeightAssembler {
            layout: FusedLinear::of_layer(&config),
            config,
            device,
            uploaded: BTreeMap::new(),
            pending: BTreeMap::new(),
            biases: BTreeMap::new(),
            fused: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &PhiConfig {
        &self.config
    }

    /// Uploads one f32 parameter, in model layout (a fused weight's part's bias waits for it).
    pub fn insert(&mut self, slot: Slot, tensor: HostTensor, file: &str) -> Result<()> {
        self.check_new(slot, file)?;
        if let Some((layer, fused)) = self.fused_bias_of(slot) {
            self.biases.insert(slot, tensor.data);
            return self.fuse_when_complete(layer, fused);
        }
        let len = tensor.data.len();
        let on_device = Tensor::<1>::from_data(TensorData::new(tensor.data, [len]), &self.device);
        self.store(slot, Stored::F32(on_device))?;
        // Its 4-bit siblings will not be fused: they go up alone.
        match self.fused_weight_of(slot) {
            Some((layer, fused)) => self.release_pending(layer, fused),
            None => Ok(()),
        }
    }

    /// Places one 4-bit parameter (checkpoint layout `[out, in]`): a linear weight or the
    /// embedding table, as packed words on the device. A layer's projection waits on the host
    /// for the rest of its fused weight.
    pub fn insert_q4(&mut self, slot: Slot, matrix: Q4Matrix, file: &str) -> Result<()> {
        if slot != Slot::EmbedTokens && !slot.is_linear_weight() {
            return Err(Error::format(
                file,
                format!("tensor `{}` cannot be 4-bit", slot.hf_name()),
            ));
        }
        self.check_new(slot, file)?;
        let shape = slot.shape(&self.config);
        if [matrix.rows, matrix.cols] != shape[..] {
            return Err(Error::TensorShape {
                name: slot.hf_name(),
                expected: shape,
                found: vec![matrix.rows, matrix.cols],
                file: file.to_string(),
            });
        }
        // Alone: not part of a fused weight, or one with an f32 part.
        let fused = self.fused_weight_of(slot).filter(|&(layer, fused)| {
            !self
                .parts_of(layer, fused)
                .iter()
                .any(|part| matches!(self.uploaded.get(part), Some(Stored::F32(_))))
        });
        let Some((layer, fused)) = fused else {
            let stored = Stored::Q4(Q4Weight::upload(matrix, &self.device));
            return self.store(slot, stored);
        };
        self.pending.insert(slot, matrix);
        self.fuse_when_complete(layer, fused)
    }

    /// Once every part of layer `layer`'s fused weight `fused` has arrived, all 4-bit, with
    /// every bias: assembles the weight and sums the biases, and uploads both.
    fn fuse_when_complete(&mut self, layer: usize, fused: usize) -> Result<()> {
        let parts = self.parts_of(layer, fused);
        let complete = parts.iter().all(|part| self.pending.contains_key(part))
            && self.layout[fused]
                .parts
                .iter()
                .all(|part| self.biases.contains_key(&Slot::Layer(layer, part.bias)));
        if !complete {
            return Ok(());
        }
        let bias = fused_bias(&self.layout[fused], layer, &mut self.biases, &self.device);
        let fused = &self.layout[fused];
        let matrices: Vec<Q4Matrix> = parts
            .iter()
            .map(|part| self.pending.remove(part).expect("checked above"))
            .collect();
        let placed: Vec<(&Q4Matrix, usize, usize)> = matrices
            .iter()
            .zip(&fused.parts)
            .map(|(matrix, part)| (matrix, part.row, part.col))
            .collect();
        let whole = Q4Matrix::assemble(fused.rows, fused.cols, &placed);
        drop(placed);
        drop(matrices);
        self.fused
            .insert(parts[0], (Q4Weight::upload(whole, &self.device), bias));
        for part in &fused.parts {
            self.uploaded
                .insert(Slot::Layer(layer, part.weight), Stored::Fused);
            self.uploaded
                .insert(Slot::Layer(layer, part.bias), Stored::Fused);
        }
        self.flush(&format!(
            "layer {layer}'s fused weight from `{}`",
            parts[0].hf_name()
        ))
    }

    /// The weight slots of layer `layer`'s fused weight `fused` (an index in `layout`).
    fn parts_of(&self, layer: usize, fused: usize) -> Vec<Slot> {
        self.layout[fused]
            .parts
            .iter()
            .map(|part| Slot::Layer(layer, part.weight))
            .collect()
    }

    /// Uploads alone the 4-bit parts of a fused weight that waited for siblings which came in
    /// f32.
    fn release_pending(&mut self, layer: usize, fused: usize) -> Result<()> {
        for part in self.parts_of(layer, fused) {
            if let Some(matrix) = self.pending.remove(&part) {
                self.store(part, Stored::Q4(Q4Weight::upload(matrix, &self.device)))?;
            }
        }
        Ok(())
    }

    /// The layer and the index in `layout` of the fused weight `slot` is a part's weight of,
    /// if any.
    fn fused_weight_of(&self, slot: Slot) -> Option<(usize, usize)> {
        self.fused_part_of(slot, |part| part.weight)
    }

    /// The same for a part's bias.
    fn fused_bias_of(&self, slot: Slot) -> Option<(usize, usize)> {
        self.fused_part_of(slot, |part| part.bias)
    }

    fn fused_part_of(
        &self,
        slot: Slot,
        param_of: fn(&FusedPart) -> LayerParam,
    ) -> Option<(usize, usize)> {
        let Slot::Layer(layer, param) = slot else {
            return None;
        };
        let fused = self
            .layout
            .iter()
            .position(|fused| fused.parts.iter().any(|part| param_of(part) == param))?;
        Some((layer, fused))
    }

    fn check_new(&self, slot: Slot, file: &str) -> Result<()> {
        if self.uploaded.contains_key(&slot)
            || self.pending.contains_key(&slot)
            || self.biases.contains_key(&slot)
        {
            return Err(Error::format(
                file,
                format!(
                    "tensor `{}` appears twice in the checkpoint",
                    slot.hf_name()
                ),
            ));
        }
        Ok(())
    }

    /// Keeps an uploaded parameter (checked new with [`Self::check_new`]).
    fn store(&mut self, slot: Slot, stored: Stored) -> Result<()> {
        self.uploaded.insert(slot, stored);
        self.flush(&format!("`{}`", slot.hf_name()))
    }

    /// Hands an upload to the device now (without waiting for it): cubecl queues up to 32
    /// tasks before it submits them, and each queued upload holds its bytes in (wasm) memory.
    /// cubecl 0.11.3's flush submits nothing while no kernel is queued, and then an upload's
    /// staging copy waits for 64 more writes: a one-element fill queues one. (Before the
    /// kernel options were passed explicitly, every upload made such a tensor while asking
    /// which kernels to use; without it a native load on lavapipe held more memory at its peak
    /// and took longer: BENCHMARKS.md.)
    fn flush(&self, what: &str) -> Result<()> {
        drop(Tensor::<1>::zeros([1], &self.device));
        self.device
            .flush()
            .map_err(|e| Error::Device(format!("uploading {what}: {e}")))
    }

    /// Checks that every parameter arrived and hands them over. (No weight waits then: a fused
    /// weight's parts were either all 4-bit and fused, or released by an f32 sibling; the
    /// biases of released ones go along, for the model to sum.)
    pub fn finish(self) -> Result<Weights> {
        // A part waiting in `pending` arrived: what is missing is a sibling or a bias.
        let arrived = |slot: &Slot| {
            self.uploaded.contains_key(slot)
                || self.biases.contains_key(slot)
                || self.pending.contains_key(slot)
        };
        let missing = Slot::all(&self.config)
            .into_iter()
            .find(|slot| !arrived(slot));
        if let Some(slot) = missing {
            return Err(Error::MissingTensor {
                name: slot.hf_name(),
            });
        }
        debug_assert!(self.pending.is_empty(), "every part arrived, so none waits");
        Ok(Weights {
            config: self.config,
            tensors: self.uploaded,
            biases: self.biases,
            fused: self.fused,
        })
    }
}

/// All parameters, flat; the model reshapes them as it takes them.
pub struct Weights {
    pub config: PhiConfig,
    tensors: BTreeMap<Slot, Stored>,
    /// See [`WeightAssembler`].
    biases: BTreeMap<Slot, Vec<f32>>,
    fused: BTreeMap<Slot, (Q4Weight, Tensor<1>)>,
}

impl Weights {
    fn remove(&mut self, slot: Slot) -> Stored {
        self.tensors
            .remove(&slot)
            .expect("WeightAssembler::finish checked every slot")
    }

    /// Takes an f32 parameter in model layout (linear weights `[in, out]`).
    pub fn take<const D: usize>(&mut self, slot: Slot) -> Tensor<D> {
        let mut shape = slot.shape(&self.config);
        if slot.is_linear_weight() {
            shape.reverse();
        }
        let dims: [usize; D] = shape.try_into().expect("slot rank matches the caller");
        match self.remove(slot) {
            Stored::F32(flat) => flat.reshape(dims),
            _ => panic!(
                "{} is 4-bit; the model takes it with take_matrix or take_fused",
                slot.hf_name()
            ),
        }
    }

    /// Takes a weight matrix: a linear weight (`lm_head`, an unfused projection) or the
    /// embedding table, f32 or 4-bit as it arrived.
    pub fn take_matrix(&mut self, slot: Slot) -> Matrix {
        match self.tensors.get(&slot) {
            Some(Stored::Q4(_)) => match self.remove(slot) {
                Stored::Q4(weight) => Matrix::Q4(weight),
                _ => unreachable!(),
            },
            _ => Matrix::F32(self.take(slot)),
        }
    }

    /// Layer `layer`'s `fused` matmul and its bias: the 4-bit weight the assembler fused, or
    /// one assembled in f32 where its parts are not all 4-bit (a GGUF file's k-quants are read
    /// as f32).
    pub fn take_fused(
        &mut self,
        layer: usize,
        fused: &FusedLinear,
        device: &Device,
    ) -> (Matrix, Tensor<1>) {
        let slot = |param| Slot::Layer(layer, param);
        for part in &fused.parts {
            if matches!(self.tensors.get(&slot(part.weight)), Some(Stored::Fused)) {
                self.remove(slot(part.weight));
                self.remove(slot(part.bias));
            }
        }
        if let Some((weight, bias)) = self.fused.remove(&slot(fused.parts[0].weight)) {
            return (Matrix::Q4(weight), bias);
        }
        let bias = fused_bias(fused, layer, &mut self.biases, device);
        let mut weight = Tensor::<2>::zeros([fused.cols, fused.rows], device);
        for part in &fused.parts {
            let values = match self.remove(slot(part.weight)) {
                Stored::F32(flat) => {
                    let shape = slot(part.weight).shape(&self.config);
                    flat.reshape([shape[1], shape[0]])
                }
                Stored::Q4(weight) => weight.to_f32(device),
                Stored::Fused => unreachable!("a fused part has its fused weight"),
            };
            let [inputs, outputs] = values.dims();
            let (row, col) = (part.row, part.col);
            weight = weight.slice_assign([col..col + inputs, row..row + outputs], values);
        }
        (Matrix::F32(weight), bias)
    }
}

/// The bias of layer `layer`'s `fused` weight, on `device`: its parts' biases (taken from
/// `biases`) at their output offsets, those sharing outputs (parts side by side along the
/// inputs) added up.
fn fused_bias(
    fused: &FusedLinear,
    layer: usize,
    biases: &mut BTreeMap<Slot, Vec<f32>>,
    device: &Device,
) -> Tensor<1> {
    let mut sum = vec![0.0f32; fused.rows];
    for part in &fused.parts {
        let values = biases
            .remove(&Slot::Layer(layer, part.bias))
            .expect("every bias arrived (checked before)");
        for (out, value) in sum[part.row..part.row + values.len()]
            .iter_mut()
            .zip(values)
        {
            *out += value;
        }
    }
    Tensor::from_data(TensorData::new(sum, [fused.rows]), device)
}

/// Puts checkpoint values into model layout: linear weights go from `[out, in]` to `[in, out]`
/// so the forward pass is a plain `x · W`.
pub fn host_layout(slot: Slot, checkpoint_shape: Vec<usize>, values: Vec<f32>) -> HostTensor {
    if !slot.is_linear_weight() {
        return HostTensor {
            shape: checkpoint_shape,
            data: values,
        };
    }
    let (rows, cols) = (checkpoint_shape[0], checkpoint_shape[1]);
    let mut transposed = vec![0.0f32; values.len()];
    for (r, row) in values.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            transposed[c * rows + r] = v;
        }
    }
    HostTensor {
        shape: vec![cols, rows],
        data: transposed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::names::LayerParam::*;

    /// A 2-layer model small enough to build by hand, on burn's CPU backend.
    fn small() -> (PhiConfig, Device) {
        let config = PhiConfig {
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 70,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            max_position_embeddings: 16,
            ..PhiConfig::phi2()
        };
        (config, Device::flex())
    }

    fn q4(slot: Slot, config: &PhiConfig, seed: usize) -> Q4Matrix {
        let shape = slot.shape(config);
        let values: Vec<f32> = (0..shape[0] * shape[1])
            .map(|i| ((i * 7 + seed * 13) % 17) as f32 - 8.0)
            .collect();
        Q4Matrix::quantize(&values, shape[0], shape[1])
    }

    #[test]
    fn a_layers_4bit_projections_are_fused_on_the_host_once_all_have_arrived() {
        let (config, device) = small();
        let mut assembler = WeightAssembler::new(config.clone(), device.clone());
        let layer = |param| Slot::Layer(1, param);
        let [fan_out, fan_in] = FusedLinear::of_layer(&config);
        // Biases first, each worth its number: the fused ones hold them summed.
        for (n, bias) in [QProjBias, KProjBias, VProjBias, DenseBias, Fc1Bias, Fc2Bias]
            .into_iter()
            .enumerate()
        {
            let len = layer(bias).shape(&config)[0];
            let values = HostTensor {
                shape: vec![len],
                data: vec![n as f32; len],
            };
            assembler.insert(layer(bias), values, "test").unwrap();
        }
        let mut parts = Vec::new();
        for (seed, param) in [
            QProjWeight,
            KProjWeight,
            VProjWeight,
            DenseWeight,
            Fc1Weight,
        ]
        .into_iter()
        .enumerate()
        {
            let matrix = q4(layer(param), &config, seed);
            parts.push((param, matrix.clone()));
            assembler.insert_q4(layer(param), matrix, "test").unwrap();
        }
        // fc1 completed [fc1 | q | k | v]; dense waits for fc2.
        assert_eq!(
            assembler.pending.keys().collect::<Vec<_>>(),
            [&layer(DenseWeight)]
        );
        assert!(assembler.fused.contains_key(&layer(Fc1Weight)));
        let err = assembler
            .insert_q4(
                layer(DenseWeight),
                q4(layer(DenseWeight), &config, 0),
                "again.bin",
            )
            .unwrap_err();
        assert!(err.to_string().contains("appears twice"), "{err}");

        let Some((Q4Weight::Host(fused), _)) = assembler.fused.get(&layer(Fc1Weight)) else {
            panic!("no fused [fc1 | q | k | v]")
        };
        assert_eq!([fused.rows, fused.cols], [fan_out.rows, fan_out.cols]);
        for placed in &fan_out.parts {
            let (_, part) = parts.iter().find(|(p, _)| *p == placed.weight).unwrap();
            for r in 0..part.rows {
                for c in 0..part.cols {
                    let value = fused.value(placed.row + r, placed.col + c);
                    assert_eq!(value, part.value(r, c), "{placed:?}");
                }
            }
        }
        assembler
            .insert_q4(layer(Fc2Weight), q4(layer(Fc2Weight), &config, 9), "test")
            .unwrap();
        assert!(assembler.pending.is_empty() && assembler.biases.is_empty());
        let (_, bias) = &assembler.fused[&layer(fan_in.parts[0].weight)];
        let bias = crate::block_on(bias.clone().into_data_async())
            .unwrap()
            .try_into_vec::<f32>()
            .unwrap();
        // fc2's bias (5) and dense's (3) share the outputs of [fc2 | dense]: they add up.
        assert_eq!(bias, vec![8.0; fan_in.rows]);
    }

    #[test]
    fn a_layer_mixing_4bit_and_f32_projections_holds_nothing_back() {
        let (config, device) = small();
        let mut assembler = WeightAssembler::new(config.clone(), device);
        let layer = |param| Slot::Layer(0, param);
        let insert_f32 = |assembler: &mut WeightAssembler, slot: Slot| {
            let shape = slot.shape(&config);
            let values = vec![0.5; shape[0] * shape[1]];
            assembler
                .insert(slot, host_layout(slot, shape, values), "test")
                .unwrap();
        };
        // fc2 waits for dense, which comes in f32: fc2 goes up alone at once.
        let fc2 = q4(layer(Fc2Weight), &config, 1);
        assembler.insert_q4(layer(Fc2Weight), fc2, "test").unwrap();
        assert_eq!(assembler.pending.len(), 1);
        insert_f32(&mut assembler, layer(DenseWeight));
        assert!(assembler.pending.is_empty());
        assert!(matches!(
            assembler.uploaded.get(&layer(Fc2Weight)),
            Some(Stored::Q4(_))
        ));
        // After an f32 part, 4-bit siblings do not wait.
        insert_f32(&mut assembler, layer(QProjWeight));
        let k = q4(layer(KProjWeight), &config, 2);
        assembler.insert_q4(layer(KProjWeight), k, "test").unwrap();
        assert!(assembler.pending.is_empty());
        assert!(assembler.fused.is_empty());
        // A part of the wrong shape is an error naming it and its file.
        let wrong = Q4Matrix::quantize(&[0.25; 64], 2, 32);
        let err = assembler
            .insert_q4(layer(VProjWeight), wrong, "bad.bin")
            .unwrap_err()
            .to_string();
        assert!(err.contains("v_proj") && err.contains("bad.bin"), "{err}");
    }
}
