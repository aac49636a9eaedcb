//! Hugging Face safetensors checkpoints (single file or sharded), f32/f16/bf16.
//!
//! Shards are handed over one at a time; each tensor is converted, checked and uploaded to
//! the device as soon as it is read, so host memory never holds more than one shard. (The
//! assembler is shared with the bundle loader, whose 4-bit projections wait for the rest of
//! their layer: see [`WeightAssembler`].)

use std::collections::{BTreeMap, BTreeSet};

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::names::{target, LayerParam, Slot};
use crate::config::PhiConfig;
use crate::error::{Error, Result};
use crate::kernels::Q4Weight;
use crate::model::{Embedding, FusedLinear, Linear};
use crate::quant::Q4Matrix;

/// A tensor in host memory, in the layout the model uses (linear weights `[in, out]`).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A parameter where the model will use it.
#[allow(clippy::large_enum_variant)] // a few per model, not worth a box
enum Stored {
    Dense(Tensor<1>),
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
/// the device instead copied every weight once more there, 9 s of a 24 s cached load on a
/// CPU-emulated adapter. Their biases are summed into one here too, and kept on the host until
/// then (a few KB): summing them on the device at the end of a load cost 3.9 s in Chromium.
/// A layer mixing 4-bit and f32 projections is assembled in f32 by the model: its 4-bit parts
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

    /// Reads one safetensors file; `file` names it in errors.
    pub fn add_safetensors(&mut self, bytes: &[u8], file: &str) -> Result<()> {
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::format(file, format!("not a valid safetensors file: {e}")))?;
        let mut names = tensors.names();
        names.sort();
        for name in names {
            let view = tensors
                .tensor(name)
                .map_err(|e| Error::format(file, format!("tensor `{name}`: {e}")))?;
            let slots = target(name, &self.config)
                .ok_or_else(|| Error::UnexpectedTensor {
                    name: name.to_string(),
                    file: file.to_string(),
                })?
                .slots();
            let Some(&(first, _)) = slots.first() else {
                continue; // a buffer the model recomputes
            };
            // A fused q/k/v tensor stacks its three parts along the output rows.
            let mut expected = first.shape(&self.config);
            expected[0] *= slots.len();
            check_shape(name, view.shape(), &expected, file)?;
            let values = to_f32(name, view.dtype(), view.data(), file)?;
            let part_len = values.len() / slots.len();
            for (&(slot, _), part) in slots.iter().zip(values.chunks_exact(part_len)) {
                let shape = slot.shape(&self.config);
                self.insert(slot, host_layout(slot, shape, part.to_vec()), file)?;
            }
        }
        Ok(())
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
        self.store(slot, Stored::Dense(on_device))?;
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
        if slot != Slot::Embedding && !slot.is_linear_weight() {
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
                .any(|part| matches!(self.uploaded.get(part), Some(Stored::Dense(_))))
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
                .all(|&(_, bias, ..)| self.biases.contains_key(&Slot::Layer(layer, bias)));
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
            .map(|(matrix, &(_, _, row, col))| (matrix, row, col))
            .collect();
        let whole = Q4Matrix::assemble(fused.rows, fused.cols, &placed);
        drop(placed);
        drop(matrices);
        self.fused
            .insert(parts[0], (Q4Weight::upload(whole, &self.device), bias));
        for &(weight, bias, ..) in &fused.parts {
            self.uploaded
                .insert(Slot::Layer(layer, weight), Stored::Fused);
            self.uploaded
                .insert(Slot::Layer(layer, bias), Stored::Fused);
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
            .map(|&(weight, ..)| Slot::Layer(layer, weight))
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
        self.fused_part_of(slot, |&(weight, ..)| weight)
    }

    /// The same for a part's bias.
    fn fused_bias_of(&self, slot: Slot) -> Option<(usize, usize)> {
        self.fused_part_of(slot, |&(_, bias, ..)| bias)
    }

    fn fused_part_of(
        &self,
        slot: Slot,
        param_of: fn(&(LayerParam, LayerParam, usize, usize)) -> LayerParam,
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
    fn flush(&self, what: &str) -> Result<()> {
        self.device
            .flush()
            .map_err(|e| Error::Device(format!("uploading {what}: {e}")))
    }

    /// Checks that every parameter arrived and hands them over. (No weight waits then: a fused
    /// weight's parts were either all 4-bit and fused, or released by an f32 sibling; the
    /// biases of released ones go along, for the model to sum.)
    pub fn finish(self) -> Result<Weights> {
        let missing = Slot::all(&self.config)
            .into_iter()
            .find(|slot| !self.uploaded.contains_key(slot) && !self.biases.contains_key(slot));
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
            Stored::Dense(flat) => flat.reshape(dims),
            _ => panic!(
                "{} is 4-bit; the model takes it with take_linear or take_fused",
                slot.hf_name()
            ),
        }
    }

    pub fn take_linear(&mut self, weight: Slot, bias: Slot) -> Linear {
        let bias = self.take(bias);
        match self.tensors.get(&weight) {
            Some(Stored::Q4(_)) => match self.remove(weight) {
                Stored::Q4(weight) => Linear::Q4 { weight, bias },
                _ => unreachable!(),
            },
            _ => Linear::Dense {
                weight: self.take(weight),
                bias,
            },
        }
    }

    /// Layer `layer`'s `fused` linear: the 4-bit weight the assembler fused, or one assembled
    /// in f32 where its parts are not all 4-bit.
    pub fn take_fused(&mut self, layer: usize, fused: &FusedLinear, device: &Device) -> Linear {
        let slot = |param| Slot::Layer(layer, param);
        for &(weight, bias, ..) in &fused.parts {
            if matches!(self.tensors.get(&slot(weight)), Some(Stored::Fused)) {
                self.remove(slot(weight));
                self.remove(slot(bias));
            }
        }
        if let Some((weight, bias)) = self.fused.remove(&slot(fused.parts[0].0)) {
            return Linear::Q4 { weight, bias };
        }
        let bias = fused_bias(fused, layer, &mut self.biases, device);
        let parts = fused
            .parts
            .iter()
            .map(|&(weight, _, row, col)| {
                let part = match self.remove(slot(weight)) {
                    Stored::Dense(flat) => {
                        let shape = slot(weight).shape(&self.config);
                        flat.reshape([shape[1], shape[0]])
                    }
                    Stored::Q4(weight) => weight.to_dense(device),
                    Stored::Fused => unreachable!("a fused part has its fused weight"),
                };
                (part, row, col)
            })
            .collect();
        Linear::assemble_dense(fused.rows, fused.cols, parts, bias, device)
    }

    pub fn take_embedding(&mut self) -> Embedding {
        match self.remove(Slot::Embedding) {
            Stored::Dense(flat) => {
                let shape = Slot::Embedding.shape(&self.config);
                Embedding::Dense(flat.reshape([shape[0], shape[1]]))
            }
            Stored::Q4(table) => Embedding::Q4(table),
            Stored::Fused => unreachable!("only a layer's projections are fused"),
        }
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
    for &(_, bias, row, _) in &fused.parts {
        let part = biases
            .remove(&Slot::Layer(layer, bias))
            .expect("every bias arrived (checked before)");
        for (out, value) in sum[row..row + part.len()].iter_mut().zip(part) {
            *out += value;
        }
    }
    Tensor::from_data(TensorData::new(sum, [fused.rows]), device)
}

pub(crate) fn check_shape(
    name: &str,
    found: &[usize],
    expected: &[usize],
    file: &str,
) -> Result<()> {
    if found != expected {
        return Err(Error::TensorShape {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
            file: file.to_string(),
        });
    }
    Ok(())
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

pub(crate) fn to_f32(name: &str, dtype: Dtype, bytes: &[u8], file: &str) -> Result<Vec<f32>> {
    let values = match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(Error::format(
                file,
                format!(
                    "tensor `{name}` has dtype {other:?}; only F32, F16 and BF16 are supported"
                ),
            ))
        }
    };
    Ok(values)
}

/// The shard files a `model.safetensors.index.json` lists, each once, in name order.
pub fn shard_files(index_json: &str) -> Result<Vec<String>> {
    const FILE: &str = "model.safetensors.index.json";
    let value: Value = serde_json::from_str(index_json)
        .map_err(|e| Error::format(FILE, format!("not valid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::format(FILE, "field `weight_map` is missing or not an object"))?;
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::format(FILE, format!("weight_map[`{tensor}`] is not a file name"))
        })?;
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(Error::format(
                FILE,
                format!("weight_map[`{tensor}`] = `{file}` is not a plain file name"),
            ));
        }
        files.insert(file.to_string());
    }
    if files.is_empty() {
        return Err(Error::format(FILE, "weight_map lists no files"));
    }
    Ok(files.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::LayerParam::*;

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
        for (n, bias) in [QBias, KBias, VBias, DenseBias, Fc1Bias, Fc2Bias]
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
        for (seed, param) in [QWeight, KWeight, VWeight, DenseWeight, Fc1Weight]
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
        for &(param, _, row, col) in &fan_out.parts {
            let (_, part) = parts.iter().find(|(p, _)| *p == param).unwrap();
            for r in 0..part.rows {
                for c in 0..part.cols {
                    assert_eq!(fused.value(row + r, col + c), part.value(r, c), "{param:?}");
                }
            }
        }
        assembler
            .insert_q4(layer(Fc2Weight), q4(layer(Fc2Weight), &config, 9), "test")
            .unwrap();
        assert!(assembler.pending.is_empty() && assembler.biases.is_empty());
        let (_, bias) = &assembler.fused[&layer(fan_in.parts[0].0)];
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
        insert_f32(&mut assembler, layer(QWeight));
        let k = q4(layer(KWeight), &config, 2);
        assembler.insert_q4(layer(KWeight), k, "test").unwrap();
        assert!(assembler.pending.is_empty());
        assert!(assembler.fused.is_empty());
        // A part of the wrong shape is an error naming it and its file.
        let wrong = Q4Matrix::quantize(&[0.25; 64], 2, 32);
        let err = assembler
            .insert_q4(layer(VWeight), wrong, "bad.bin")
            .unwrap_err()
            .to_string();
        assert!(err.contains("v_proj") && err.contains("bad.bin"), "{err}");
    }
}
