//! Hugging Face safetensors checkpoints (single file or sharded), f32/f16/bf16.
//!
//! Shards are handed over one at a time; each tensor is converted, checked and given to the
//! [`WeightAssembler`] (which uploads it) as soon as it is read, so host memory never holds
//! more than one shard.

use std::collections::BTreeSet;

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::assembler::{host_layout, WeightAssembler};
use super::names::target;
use crate::error::{Error, Result};

/// Reads one safetensors file into `assembler`; `file` names it in errors.
pub fn add_safetensors(assembler: &mut WeightAssembler, bytes: &[u8], file: &str) -> Result<()> {
    let tensors = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::format(file, format!("not a valid safetensors file: {e}")))?;
    let mut names = tensors.names();
    names.sort();
    for name in names {
        let view = tensors
            .tensor(name)
            .map_err(|e| Error::format(file, format!("tensor `{name}`: {e}")))?;
        let slots = target(name, assembler.config())
            .ok_or_else(|| Error::UnexpectedTensor {
                name: name.to_string(),
                file: file.to_string(),
            })?
            .slots();
        let Some(&(first, _)) = slots.first() else {
            continue; // a buffer the model recomputes
        };
        // A fused q/k/v tensor stacks its three parts along the output rows.
        let mut expected = first.shape(assembler.config());
        expected[0] *= slots.len();
        check_shape(name, view.shape(), &expected, file)?;
        let values = to_f32(name, view.dtype(), view.data(), file)?;
        let part_len = values.len() / slots.len();
        for (&(slot, _), part) in slots.iter().zip(values.chunks_exact(part_len)) {
            let shape = slot.shape(assembler.config());
            assembler.insert(slot, host_layout(slot, shape, part.to_vec()), file)?;
        }
    }
    Ok(())
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
