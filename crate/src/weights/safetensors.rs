//! Hugging Face safetensors checkpoints (single file or sharded), f32/f16/bf16.
//!
//! Shards are handed over one at a time; each tensor is converted, checked and uploaded to
//! the device as soon as it is read, so host memory never holds more than one shard.

use std::collections::{BTreeMap, BTreeSet};

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::names::{target, Slot};
use crate::config::PhiConfig;
use crate::error::{Error, Result};
use crate::kernels::Q4Weight;
use crate::model::{Embedding, Linear};
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
}

/// Collects the model's parameters on the device, shard by shard (or chunk by chunk).
pub struct WeightAssembler {
    config: PhiConfig,
    device: Device,
    uploaded: BTreeMap<Slot, Stored>,
}

impl WeightAssembler {
    pub fn new(config: PhiConfig, device: Device) -> Self {
        WeightAssembler {
            config,
            device,
            uploaded: BTreeMap::new(),
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

    /// Uploads one f32 parameter, in model layout.
    pub fn insert(&mut self, slot: Slot, tensor: HostTensor, file: &str) -> Result<()> {
        let len = tensor.data.len();
        let on_device = Tensor::<1>::from_data(TensorData::new(tensor.data, [len]), &self.device);
        self.store(slot, Stored::Dense(on_device), file)
    }

    /// Places one 4-bit parameter (checkpoint layout `[out, in]`): a linear weight or the
    /// embedding table, as packed words on the device.
    pub fn insert_q4(&mut self, slot: Slot, matrix: Q4Matrix, file: &str) -> Result<()> {
        if slot != Slot::Embedding && !slot.is_linear_weight() {
            return Err(Error::format(
                file,
                format!("tensor `{}` cannot be 4-bit", slot.hf_name()),
            ));
        }
        let stored = Stored::Q4(Q4Weight::upload(matrix, &self.device));
        self.store(slot, stored, file)
    }

    fn store(&mut self, slot: Slot, stored: Stored, file: &str) -> Result<()> {
        if self.uploaded.insert(slot, stored).is_some() {
            return Err(Error::format(
                file,
                format!(
                    "tensor `{}` appears twice in the checkpoint",
                    slot.hf_name()
                ),
            ));
        }
        // Hands the upload to the device now (without waiting for it): cubecl queues up to 32
        // tasks before it submits them, and each queued upload holds its bytes in (wasm) memory.
        self.device
            .flush()
            .map_err(|e| Error::Device(format!("uploading `{}`: {e}", slot.hf_name())))
    }

    /// Checks that every parameter arrived and hands them over.
    pub fn finish(self) -> Result<Weights> {
        let missing = Slot::all(&self.config)
            .into_iter()
            .find(|slot| !self.uploaded.contains_key(slot));
        if let Some(slot) = missing {
            return Err(Error::MissingTensor {
                name: slot.hf_name(),
            });
        }
        Ok(Weights {
            config: self.config,
            tensors: self.uploaded,
        })
    }
}

/// All parameters, flat; the model reshapes them as it takes them.
pub struct Weights {
    pub config: PhiConfig,
    tensors: BTreeMap<Slot, Stored>,
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
                "{} is 4-bit; the model takes it with take_linear",
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

    pub fn take_embedding(&mut self) -> Embedding {
        match self.remove(Slot::Embedding) {
            Stored::Dense(flat) => {
                let shape = Slot::Embedding.shape(&self.config);
                Embedding::Dense(flat.reshape([shape[0], shape[1]]))
            }
            Stored::Q4(table) => Embedding::Q4(table),
        }
    }
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
