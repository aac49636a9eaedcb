//! Writing bundles: from a Hugging Face checkpoint (`phi2 convert`) or from random weights with
//! a model's shapes (`phi2 synth`). One tensor is in memory at a time; the bundle is written
//! into `<out>.partial` and renamed when complete, so a failed run never leaves a directory
//! that looks like a bundle.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;

use super::bundle::{ChunkWriter, Manifest, TensorBytes, FORMAT, MANIFEST, QUANTIZATION, VERSION};
use super::names::{target, Slot};
use super::safetensors::{check_shape, shard_files, to_f32};
use crate::config::PhiConfig;
use crate::error::{Error, Result};
use crate::quant::Q4Matrix;

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub bytes: u64,
    pub chunks: usize,
    pub parameters: u64,
    pub bits_per_weight: f64,
}

fn io(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::io(path.display().to_string(), e)
}

/// Which tensors are 4-bit: every linear weight and the embedding table.
fn quantized(slot: Slot) -> bool {
    slot.is_linear_weight() || slot == Slot::EmbedTokens
}

/// A tensor as a source provides it, in checkpoint layout.
enum SlotData {
    Values(Vec<f32>),
    /// Already 4-bit in our layout (a GGUF Q4_0 tensor): carried over as is.
    Q4(Q4Matrix),
}

/// Writes a bundle; `values(slot)` gives each tensor.
fn write_bundle(
    config: &PhiConfig,
    tokenizer_json: &[u8],
    out: &Path,
    chunk_bytes: u64,
    mut values: impl FnMut(Slot) -> Result<SlotData>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Summary> {
    if out.exists() {
        return Err(io(out, "already exists; remove it or choose another --out"));
    }
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    if partial.exists() {
        fs::remove_dir_all(&partial).map_err(|e| io(&partial, e))?;
    }
    fs::create_dir_all(&partial).map_err(|e| io(&partial, e))?;
    let result = (|| {
        let mut writer = ChunkWriter::new(chunk_bytes, |chunk, bytes: &[u8]| {
            let path = partial.join(&chunk.file);
            fs::write(&path, bytes).map_err(|e| io(&path, e))
        })?;
        let slots = Slot::all(config);
        let mut parameters = 0u64;
        for (i, &slot) in slots.iter().enumerate() {
            let shape = slot.shape(config);
            parameters += shape.iter().product::<usize>() as u64;
            let tensor = match (values(slot)?, quantized(slot)) {
                (SlotData::Values(v), true) => {
                    TensorBytes::Q4(Q4Matrix::quantize(&v, shape[0], shape[1]))
                }
                (SlotData::Values(v), false) => TensorBytes::F32(v),
                (SlotData::Q4(m), true) => TensorBytes::Q4(m),
                (SlotData::Q4(m), false) => TensorBytes::F32(m.dequantize()),
            };
            writer.add(&slot.hf_name(), shape, &tensor)?;
            progress(i + 1, slots.len());
        }
        let (tensors, chunks) = writer.finish()?;
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            config: config.clone(),
            tokenizer: "tokenizer.json".into(),
            quantization: QUANTIZATION.into(),
            tensors,
            chunks,
        };
        let tokenizer_path = partial.join("tokenizer.json");
        fs::write(&tokenizer_path, tokenizer_json).map_err(|e| io(&tokenizer_path, e))?;
        let manifest_path = partial.join(MANIFEST);
        let text = serde_json::to_string_pretty(&manifest).expect("a manifest serializes");
        fs::write(&manifest_path, text).map_err(|e| io(&manifest_path, e))?;
        let bytes = manifest.total_bytes();
        Ok(Summary {
            bytes,
            chunks: manifest.chunks.len(),
            parameters,
            bits_per_weight: bytes as f64 * 8.0 / parameters as f64,
        })
    })();
    match result {
        Ok(summary) => {
            fs::rename(&partial, out).map_err(|e| io(out, e))?;
            Ok(summary)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&partial);
            Err(e)
        }
    }
}

/// Where each parameter sits in a checkpoint: shard, tensor name, and which third of a fused
/// q/k/v tensor.
struct Located {
    shard: usize,
    name: String,
    qkv_part: Option<usize>,
}

/// Converts a Hugging Face checkpoint directory into a bundle.
pub fn convert_hf(
    dir: &Path,
    out: &Path,
    chunk_bytes: u64,
    progress: impl FnMut(usize, usize),
) -> Result<Summary> {
    let read = |name: &str| fs::read(dir.join(name)).map_err(|e| io(&dir.join(name), e));
    let config_text =
        String::from_utf8(read("config.json")?).map_err(|e| io(&dir.join("config.json"), e))?;
    let config = PhiConfig::from_json_str(&config_text)?;
    let tokenizer = read("tokenizer.json")?;
    crate::tokenizer::PhiTokenizer::from_bytes(
        &tokenizer,
        &dir.join("tokenizer.json").display().to_string(),
    )?;
    let index = dir.join("model.safetensors.index.json");
    let shards = if index.exists() {
        let text = fs::read_to_string(&index).map_err(|e| io(&index, e))?;
        shard_files(&text)?
    } else {
        vec!["model.safetensors".to_string()]
    };
    let maps = shards
        .iter()
        .map(|shard| {
            let path = dir.join(shard);
            let file = fs::File::open(&path).map_err(|e| io(&path, e))?;
            // SAFETY: the file is only read; a concurrent writer could change what we read,
            // which the per-tensor shape and length checks would catch as a format error.
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io(&path, e))
        })
        .collect::<Result<Vec<_>>>()?;
    let parsed = maps
        .iter()
        .zip(&shards)
        .map(|(map, shard)| {
            SafeTensors::deserialize(map).map_err(|e| {
                Error::format(
                    dir.join(shard).display().to_string(),
                    format!("not valid safetensors: {e}"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut located = BTreeMap::new();
    for (shard, tensors) in parsed.iter().enumerate() {
        let file = dir.join(&shards[shard]).display().to_string();
        for name in tensors.names() {
            let entries = target(name, &config)
                .ok_or_else(|| Error::UnexpectedTensor {
                    name: name.to_string(),
                    file: file.clone(),
                })?
                .slots();
            for (slot, qkv_part) in entries {
                let previous = located.insert(
                    slot,
                    Located {
                        shard,
                        name: name.to_string(),
                        qkv_part,
                    },
                );
                if previous.is_some() {
                    return Err(Error::format(
                        file,
                        format!("tensor `{}` appears twice", slot.hf_name()),
                    ));
                }
            }
        }
    }
    let values = |slot: Slot| -> Result<SlotData> {
        let at = located.get(&slot).ok_or_else(|| Error::MissingTensor {
            name: slot.hf_name(),
        })?;
        let file = dir.join(&shards[at.shard]).display().to_string();
        let view = parsed[at.shard]
            .tensor(&at.name)
            .map_err(|e| Error::format(&file, format!("tensor `{}`: {e}", at.name)))?;
        let mut expected = slot.shape(&config);
        if at.qkv_part.is_some() {
            expected[0] *= 3;
        }
        check_shape(&at.name, view.shape(), &expected, &file)?;
        let all = to_f32(&at.name, view.dtype(), view.data(), &file)?;
        release_pages(&maps[at.shard], view.data());
        Ok(SlotData::Values(match at.qkv_part {
            None => all,
            Some(part) => {
                let len = all.len() / 3;
                all[part * len..(part + 1) * len].to_vec()
            }
        }))
    };
    write_bundle(&config, &tokenizer, out, chunk_bytes, values, progress)
}

/// Drops a converted tensor's pages from this process's memory: a mapped checkpoint would
/// otherwise stay resident as it is read, and peak memory would grow to the whole checkpoint.
/// The pages stay in the page cache and are read again if needed.
fn release_pages(map: &memmap2::Mmap, bytes: &[u8]) {
    let offset = bytes.as_ptr() as usize - map.as_ptr() as usize;
    // SAFETY: the mapping is read-only and file-backed, so dropped pages are simply re-read
    // from the file on the next access; nothing written is lost.
    let _ = unsafe {
        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, bytes.len())
    };
}

/// A bundle with random weights of a model's shapes: load and speed benchmarks do not depend
/// on the values. Deterministic for a seed.
pub fn synthesize(
    config: &PhiConfig,
    tokenizer_json: &[u8],
    out: &Path,
    chunk_bytes: u64,
    seed: u64,
    progress: impl FnMut(usize, usize),
) -> Result<Summary> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values = |slot: Slot| -> Result<SlotData> {
        let shape = slot.shape(config);
        let n: usize = shape.iter().product();
        Ok(SlotData::Values(match slot {
            Slot::FinalLayernormWeight
            | Slot::Layer(_, super::names::LayerParam::InputLayernormWeight) => vec![1.0; n],
            _ => {
                // Uniform with the variance of a 1/sqrt(fan_in) normal: activations stay sane.
                let bound = 3f32.sqrt() / (*shape.last().unwrap() as f32).sqrt();
                let bound = if shape.len() == 1 { 0.02 } else { bound };
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            }
        }))
    };
    write_bundle(config, tokenizer_json, out, chunk_bytes, values, progress)
}

/// Converts a llama.cpp GGUF file (architecture `phi2`) into a bundle. Q4_0 tensors are carried
/// over exactly; other types are dequantized and, where the bundle stores 4-bit, requantized.
/// The tokenizer is `tokenizer` when given, else rebuilt from the GGUF metadata.
pub fn convert_gguf(
    path: &Path,
    tokenizer: Option<&Path>,
    out: &Path,
    chunk_bytes: u64,
    progress: impl FnMut(usize, usize),
) -> Result<Summary> {
    let file = fs::File::open(path).map_err(|e| io(path, e))?;
    // SAFETY: read-only mapping; every range is bounds-checked by the parser.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io(path, e))?;
    let label = path.display().to_string();
    let gguf = super::gguf::Gguf::parse(&map, &label)?;
    let config = gguf.phi_config()?;
    let (tokenizer_json, tokenizer_file) = match tokenizer {
        Some(p) => (fs::read(p).map_err(|e| io(p, e))?, p.display().to_string()),
        None => (
            gguf.tokenizer_json()?,
            format!("{label} (tokenizer rebuilt from its metadata)"),
        ),
    };
    crate::tokenizer::PhiTokenizer::from_bytes(&tokenizer_json, &tokenizer_file)?;
    let mut located: BTreeMap<Slot, (usize, Option<usize>)> = BTreeMap::new();
    for (index, t) in gguf.tensors.iter().enumerate() {
        let unexpected = || Error::UnexpectedTensor {
            name: t.name.clone(),
            file: label.clone(),
        };
        let hf = super::names::hf_name_of_gguf(&t.name).ok_or_else(unexpected)?;
        let parts = target(&hf, &config).ok_or_else(unexpected)?.slots();
        for (slot, part) in parts {
            if located.insert(slot, (index, part)).is_some() {
                return Err(Error::format(
                    &label,
                    format!("tensor `{}` appears twice", t.name),
                ));
            }
        }
    }
    let values = |slot: Slot| -> Result<SlotData> {
        let &(index, part) = located.get(&slot).ok_or_else(|| Error::MissingTensor {
            name: slot.hf_name(),
        })?;
        let t = &gguf.tensors[index];
        let mut expected = slot.shape(&config);
        if part.is_some() {
            expected[0] *= 3;
        }
        check_shape(&t.name, &t.shape, &expected, &label)?;
        let rows = expected[0] / if part.is_some() { 3 } else { 1 };
        let part = part.unwrap_or(0);
        if let Some(matrix) = gguf.q4_0_matrix(t) {
            return Ok(SlotData::Q4(matrix.rows_range(part * rows, rows)));
        }
        let all = gguf.dequantize(t);
        let len = all.len() / expected[0] * rows;
        Ok(SlotData::Values(all[part * len..(part + 1) * len].to_vec()))
    };
    write_bundle(&config, &tokenizer_json, out, chunk_bytes, values, progress)
}
