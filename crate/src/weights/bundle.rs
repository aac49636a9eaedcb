//! The phi2-web bundle: a model as `manifest.json` + chunk files + `tokenizer.json`.
//!
//! The chunks, concatenated, form one byte stream holding every tensor back to back at the
//! offset the manifest gives. 4-bit tensors are stored exactly as the GPU kernels read them
//! (see [`crate::quant`]): the codes' u32 words, then the scales' u32 words. Everything else is
//! little-endian f32. Loading is verify (sha256 per chunk) + copy + upload, tensor by tensor as
//! soon as its bytes are complete; host memory holds at most one chunk and one tensor.
//! The format is described for people in `docs/bundle-format.md`.

use std::collections::BTreeSet;

use half::f16;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::names::{target, Slot, Target};
use crate::config::PhiConfig;
use crate::error::{Error, Result};
use crate::quant::{padded_cols, Q4Matrix, BLOCK};

pub const FORMAT: &str = "phi2-web-bundle";
pub const VERSION: u64 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const DEFAULT_CHUNK_BYTES: u64 = 32 << 20;
pub const MAX_CHUNK_BYTES: u64 = 64 << 20;
pub const QUANTIZATION: &str = "q4-block32-f16scale";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorDtype {
    F32,
    Q4,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: TensorDtype,
    pub offset: u64,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkEntry {
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u64,
    pub config: PhiConfig,
    pub tokenizer: String,
    pub quantization: String,
    pub tensors: Vec<TensorEntry>,
    pub chunks: Vec<ChunkEntry>,
}

/// Bytes a tensor takes in the stream.
pub fn stored_size(dtype: TensorDtype, shape: &[usize]) -> u64 {
    match (dtype, shape) {
        (TensorDtype::F32, _) => shape.iter().product::<usize>() as u64 * 4,
        (TensorDtype::Q4, [rows, cols]) => {
            let values = rows * padded_cols(*cols);
            let code_words = values / 8;
            let scale_words = (values / BLOCK).div_ceil(2);
            ((code_words + scale_words) * 4) as u64
        }
        (TensorDtype::Q4, _) => u64::MAX, // rejected by validation: q4 tensors are matrices
    }
}

impl Manifest {
    /// Parses and checks a manifest; every problem names the field or tensor.
    pub fn parse(text: &str) -> Result<Self> {
        let fail = |message: String| Error::format(MANIFEST, message);
        let value: Value =
            serde_json::from_str(text).map_err(|e| fail(format!("not valid JSON: {e}")))?;
        match value.get("format").and_then(Value::as_str) {
            Some(FORMAT) => {}
            Some(other) => {
                return Err(fail(format!("field `format` is `{other}`, not `{FORMAT}`")))
            }
            None => {
                return Err(fail(format!(
                    "field `format` is missing (is this a {FORMAT}?)"
                )))
            }
        }
        match value.get("version").and_then(Value::as_u64) {
            Some(VERSION) => {}
            Some(other) => {
                return Err(fail(format!(
                    "field `version` is {other}; this build reads version {VERSION}"
                )))
            }
            None => return Err(fail("field `version` is missing or not an integer".into())),
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(|e| fail(format!("{e}")))?;
        manifest.validate()?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<()> {
        let fail = |message: String| Error::format(MANIFEST, message);
        self.config.validate()?;
        if self.quantization != QUANTIZATION {
            return Err(fail(format!(
                "field `quantization` is `{}`; this build reads `{QUANTIZATION}`",
                self.quantization
            )));
        }
        let mut seen = BTreeSet::new();
        let mut offset = 0u64;
        let mut last_layer = 0;
        for t in &self.tensors {
            let slot = match target(&t.name, &self.config) {
                Some(Target::One(slot)) => slot,
                _ => {
                    return Err(fail(format!(
                        "tensor `{}` is not part of a Phi model",
                        t.name
                    )))
                }
            };
            if !seen.insert(slot) {
                return Err(fail(format!("tensor `{}` is listed twice", t.name)));
            }
            // The loader fuses a layer's weights on the host as they arrive: layer by layer,
            // it holds one layer's at most.
            if let Slot::Layer(layer, _) = slot {
                if layer < last_layer {
                    return Err(fail(format!(
                        "tensor `{}` comes after layer {last_layer}'s: a bundle stores its \
                         layers in order",
                        t.name
                    )));
                }
                last_layer = layer;
            }
            let expected = slot.shape(&self.config);
            if t.shape != expected {
                return Err(Error::TensorShape {
                    name: t.name.clone(),
                    expected,
                    found: t.shape.clone(),
                    file: MANIFEST.into(),
                });
            }
            if t.dtype == TensorDtype::Q4 && t.shape.len() != 2 {
                return Err(fail(format!("tensor `{}`: q4 needs a matrix", t.name)));
            }
            let size = stored_size(t.dtype, &t.shape);
            if t.size != size || t.offset != offset {
                return Err(fail(format!(
                    "tensor `{}`: offset {} size {} but the stream needs offset {offset} size {size}",
                    t.name, t.offset, t.size
                )));
            }
            offset += size;
        }
        if let Some(slot) = Slot::all(&self.config)
            .into_iter()
            .find(|s| !seen.contains(s))
        {
            return Err(Error::MissingTensor {
                name: slot.hf_name(),
            });
        }
        // Files are named relative to the manifest's folder, never outside it.
        let plain =
            |name: &str| !(name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.'));
        if !plain(&self.tokenizer) {
            return Err(fail(format!(
                "tokenizer: `{}` is not a plain file name",
                self.tokenizer
            )));
        }
        let mut total = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            if !plain(&c.file) {
                return Err(fail(format!(
                    "chunk {i}: `{}` is not a plain file name",
                    c.file
                )));
            }
            if c.size == 0 || c.size > MAX_CHUNK_BYTES {
                return Err(fail(format!(
                    "chunk {i} ({}): size {} is outside 1..={MAX_CHUNK_BYTES}",
                    c.file, c.size
                )));
            }
            if c.sha256.len() != 64 || !c.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(fail(format!(
                    "chunk {i} ({}): sha256 is not 64 hex digits",
                    c.file
                )));
            }
            total += c.size;
        }
        if total != offset {
            return Err(fail(format!(
                "chunks hold {total} bytes but the tensors need {offset}"
            )));
        }
        Ok(())
    }

    pub fn total_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.size).sum()
    }
}

/// Reads `manifest.json`, naming the file in format errors.
pub fn parse_manifest(bytes: &[u8], location: &str) -> Result<Manifest> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| Error::format(location, format!("not UTF-8: {e}")))?;
    Manifest::parse(text).map_err(|e| match e {
        Error::Format { message, .. } => Error::format(location, message),
        other => other,
    })
}

/// Bytes of 4-bit weights a decoded token reads: every linear weight once (the embedding
/// table is looked up row by row, not read whole).
pub fn linear_weight_bytes(config: &PhiConfig) -> u64 {
    Slot::all(config)
        .into_iter()
        .filter(|s| s.is_linear_weight())
        .map(|s| stored_size(TensorDtype::Q4, &s.shape(config)))
        .sum()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tensor's bytes as the loader hands them over.
pub enum TensorBytes {
    F32(Vec<f32>),
    Q4(Q4Matrix),
}

/// Decodes one tensor's stored bytes (already length-checked by the stream).
pub fn decode(entry: &TensorEntry, words: Vec<u32>) -> TensorBytes {
    match entry.dtype {
        TensorDtype::F32 => TensorBytes::F32(words.into_iter().map(f32::from_bits).collect()),
        TensorDtype::Q4 => {
            let (rows, cols) = (entry.shape[0], entry.shape[1]);
            let code_words = rows * padded_cols(cols) / 8;
            let scale_count = rows * padded_cols(cols) / BLOCK;
            let scales = words[code_words..]
                .iter()
                .flat_map(|w| [f16::from_bits(*w as u16), f16::from_bits((*w >> 16) as u16)])
                .take(scale_count)
                .collect();
            let mut codes = words;
            codes.truncate(code_words);
            TensorBytes::Q4(Q4Matrix {
                rows,
                cols,
                codes,
                scales,
            })
        }
    }
}

/// Encodes a tensor for the stream.
pub fn encode(tensor: &TensorBytes) -> Vec<u8> {
    let words: Vec<u32> = match tensor {
        TensorBytes::F32(values) => values.iter().map(|v| v.to_bits()).collect(),
        TensorBytes::Q4(q) => q.codes.iter().copied().chain(q.scale_words()).collect(),
    };
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Feeds chunks, in order, and hands over each tensor as soon as its bytes are complete.
pub struct ChunkStream {
    manifest: Manifest,
    next_chunk: usize,
    next_tensor: usize,
    stream_offset: u64,
    pending: WordBuffer,
}

/// The little-endian words of one tensor, whose bytes may arrive split across chunks (even
/// inside a word).
#[derive(Default)]
struct WordBuffer {
    words: Vec<u32>,
    carry: Vec<u8>,
}

impl WordBuffer {
    fn extend(&mut self, mut bytes: &[u8]) {
        if !self.carry.is_empty() {
            let (head, rest) = bytes.split_at((4 - self.carry.len()).min(bytes.len()));
            self.carry.extend_from_slice(head);
            bytes = rest;
            if self.carry.len() < 4 {
                return;
            }
            let word =
                u32::from_le_bytes([self.carry[0], self.carry[1], self.carry[2], self.carry[3]]);
            self.words.push(word);
            self.carry.clear();
        }
        let mut whole = bytes.chunks_exact(4);
        self.words.extend(
            whole
                .by_ref()
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        self.carry.extend_from_slice(whole.remainder());
    }

    fn byte_len(&self) -> u64 {
        self.words.len() as u64 * 4 + self.carry.len() as u64
    }

    fn is_empty(&self) -> bool {
        self.byte_len() == 0
    }
}

impl ChunkStream {
    pub fn new(manifest: Manifest) -> Self {
        ChunkStream {
            manifest,
            next_chunk: 0,
            next_tensor: 0,
            stream_offset: 0,
            pending: WordBuffer::default(),
        }
    }

    /// Checks chunk `index` (size, sha256: see [`verify_chunk`] for `digest`) — `location`
    /// names it in errors — then passes every tensor it completes to `on_tensor`.
    pub fn push(
        &mut self,
        index: usize,
        bytes: &[u8],
        digest: Option<&str>,
        location: &str,
        mut on_tensor: impl FnMut(&TensorEntry, Vec<u32>) -> Result<()>,
    ) -> Result<()> {
        let chunk = self.manifest.chunks.get(index).ok_or_else(|| {
            Error::format(location, format!("chunk {index} is not in the manifest"))
        })?;
        if index != self.next_chunk {
            return Err(Error::format(
                location,
                format!("chunk {index} arrived before chunk {}", self.next_chunk),
            ));
        }
        verify_chunk(index, chunk, bytes, digest, location)?;
        let chunk_end = self.stream_offset + bytes.len() as u64;
        let mut at = 0usize;
        while let Some(entry) = self.manifest.tensors.get(self.next_tensor) {
            let tensor_end = entry.offset + entry.size;
            let take = (tensor_end.min(chunk_end) - (self.stream_offset + at as u64)) as usize;
            if self.pending.is_empty() {
                // Exactly the tensor's size: growing by doubling would briefly hold up to 3×
                // the largest tensor, which is what bounds the loader's memory.
                self.pending.words.reserve_exact((entry.size / 4) as usize);
            }
            self.pending.extend(&bytes[at..at + take]);
            at += take;
            if self.pending.byte_len() < entry.size {
                break; // continues in the next chunk
            }
            on_tensor(entry, std::mem::take(&mut self.pending.words))?;
            self.next_tensor += 1;
            if at == bytes.len() {
                break;
            }
        }
        self.stream_offset = chunk_end;
        self.next_chunk += 1;
        Ok(())
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The chunk `push` expects next.
    pub fn next_chunk(&self) -> usize {
        self.next_chunk
    }

    pub fn is_complete(&self) -> bool {
        self.next_chunk == self.manifest.chunks.len()
            && self.next_tensor == self.manifest.tensors.len()
    }
}

/// Size and sha256 of chunk `index`'s bytes against the manifest. `digest`: the bytes' sha256
/// (hex) where the caller has it already, computed over exactly these bytes by faster means
/// (the browser's WebCrypto: native code off the main thread, where sha2 in wasm was a large
/// share of a cached load: BENCHMARKS.md); else it is computed here.
pub fn verify_chunk(
    index: usize,
    chunk: &ChunkEntry,
    bytes: &[u8],
    digest: Option<&str>,
    location: &str,
) -> Result<()> {
    let fail = |message: String| Error::Integrity {
        location: location.to_string(),
        chunk: index,
        message,
    };
    if bytes.len() as u64 != chunk.size {
        return Err(fail(format!(
            "chunk {} has {} bytes; the manifest says {} (truncated or wrong file)",
            chunk.file,
            bytes.len(),
            chunk.size
        )));
    }
    let digest = digest.map_or_else(|| sha256_hex(bytes), str::to_string);
    if !digest.eq_ignore_ascii_case(&chunk.sha256) {
        return Err(fail(format!(
            "chunk {} is corrupt: sha256 {digest}, expected {}",
            chunk.file, chunk.sha256
        )));
    }
    Ok(())
}

/// Lays tensors into chunks. Collects chunk bytes and hands each full chunk to `emit`.
pub struct ChunkWriter<F: FnMut(&ChunkEntry, &[u8]) -> Result<()>> {
    chunk_bytes: u64,
    current: Vec<u8>,
    tensors: Vec<TensorEntry>,
    chunks: Vec<ChunkEntry>,
    offset: u64,
    emit: F,
}

impl<F: FnMut(&ChunkEntry, &[u8]) -> Result<()>> ChunkWriter<F> {
    pub fn new(chunk_bytes: u64, emit: F) -> Result<Self> {
        if chunk_bytes == 0 || chunk_bytes > MAX_CHUNK_BYTES {
            return Err(Error::option(
                "chunk-mb",
                format!("chunks must be 1 byte to {} MiB", MAX_CHUNK_BYTES >> 20),
            ));
        }
        Ok(ChunkWriter {
            chunk_bytes,
            current: Vec::new(),
            tensors: Vec::new(),
            chunks: Vec::new(),
            offset: 0,
            emit,
        })
    }

    pub fn add(&mut self, name: &str, shape: Vec<usize>, tensor: &TensorBytes) -> Result<()> {
        let dtype = match tensor {
            TensorBytes::F32(_) => TensorDtype::F32,
            TensorBytes::Q4(_) => TensorDtype::Q4,
        };
        let bytes = encode(tensor);
        debug_assert_eq!(bytes.len() as u64, stored_size(dtype, &shape));
        self.tensors.push(TensorEntry {
            name: name.to_string(),
            shape,
            dtype,
            offset: self.offset,
            size: bytes.len() as u64,
        });
        self.offset += bytes.len() as u64;
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let room = (self.chunk_bytes as usize) - self.current.len();
            let take = room.min(rest.len());
            self.current.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.current.len() as u64 == self.chunk_bytes {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.current.is_empty() {
            return Ok(());
        }
        let chunk = ChunkEntry {
            file: format!("chunk-{:05}.bin", self.chunks.len()),
            size: self.current.len() as u64,
            sha256: sha256_hex(&self.current),
        };
        (self.emit)(&chunk, &self.current)?;
        self.chunks.push(chunk);
        self.current.clear();
        Ok(())
    }

    /// Flushes the last chunk and returns the tensor and chunk tables.
    pub fn finish(mut self) -> Result<(Vec<TensorEntry>, Vec<ChunkEntry>)> {
        self.flush()?;
        Ok((self.tensors, self.chunks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_config() -> PhiConfig {
        PhiConfig {
            vocab_size: 40,
            hidden_size: 48,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 3,
            max_position_embeddings: 16,
            layer_norm_eps: 1e-5,
            rope_theta: 10000.0,
            partial_rotary_factor: 0.5,
            eos_token_id: None,
        }
    }

    type NamedBytes = Vec<(String, Vec<u8>)>;

    /// A manifest and its chunks with every tensor filled with a counter pattern.
    fn tiny_bundle(chunk_bytes: u64) -> (Manifest, Vec<Vec<u8>>, NamedBytes) {
        let config = tiny_config();
        let mut chunks = Vec::new();
        let mut tensors_bytes = Vec::new();
        let mut writer = ChunkWriter::new(chunk_bytes, |_, bytes: &[u8]| {
            chunks.push(bytes.to_vec());
            Ok(())
        })
        .unwrap();
        for (i, slot) in Slot::all(&config).into_iter().enumerate() {
            let shape = slot.shape(&config);
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|j| ((i * 7 + j) % 13) as f32 - 6.0).collect();
            let tensor = if slot.is_linear_weight() || slot == Slot::EmbedTokens {
                TensorBytes::Q4(Q4Matrix::quantize(&values, shape[0], shape[1]))
            } else {
                TensorBytes::F32(values)
            };
            tensors_bytes.push((slot.hf_name(), encode(&tensor)));
            writer.add(&slot.hf_name(), shape, &tensor).unwrap();
        }
        let (tensors, chunk_table) = writer.finish().unwrap();
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            config,
            tokenizer: "tokenizer.json".into(),
            quantization: QUANTIZATION.into(),
            tensors,
            chunks: chunk_table,
        };
        (manifest, chunks, tensors_bytes)
    }

    #[test]
    fn stream_delivers_every_tensor_whole_whatever_the_chunk_size() {
        // 1002: chunk boundaries that split words.
        for chunk_bytes in [1000, 1002, 4096, 1 << 20] {
            let (manifest, chunks, expected) = tiny_bundle(chunk_bytes);
            let manifest = Manifest::parse(&serde_json::to_string(&manifest).unwrap()).unwrap();
            assert!(manifest.chunks.iter().all(|c| c.size <= chunk_bytes));
            let mut stream = ChunkStream::new(manifest.clone());
            let mut got = Vec::new();
            for (i, bytes) in chunks.iter().enumerate() {
                stream
                    .push(i, bytes, None, "test", |entry, words| {
                        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                        got.push((entry.name.clone(), bytes));
                        Ok(())
                    })
                    .unwrap();
            }
            assert!(stream.is_complete());
            assert_eq!(got, expected, "chunk size {chunk_bytes}");
        }
    }

    #[test]
    fn q4_and_f32_encodings_round_trip() {
        let q = Q4Matrix::quantize(
            &[0.5, -1.0, 0.25, 3.0, 0.0, 1.5, -2.0, 7.0].repeat(9),
            3,
            24,
        );
        let entry = TensorEntry {
            name: "x".into(),
            shape: vec![3, 24],
            dtype: TensorDtype::Q4,
            offset: 0,
            size: stored_size(TensorDtype::Q4, &[3, 24]),
        };
        let bytes = encode(&TensorBytes::Q4(q.clone()));
        assert_eq!(bytes.len() as u64, entry.size);
        let words = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        match decode(&entry, words) {
            TensorBytes::Q4(back) => assert_eq!(back, q),
            TensorBytes::F32(_) => panic!("decoded as f32"),
        }
    }

    #[test]
    fn corrupt_truncated_and_out_of_order_chunks_are_named() {
        let (manifest, chunks, _) = tiny_bundle(4096);
        let mut corrupt = chunks[1].clone();
        corrupt[10] ^= 1;
        let mut stream = ChunkStream::new(manifest.clone());
        stream
            .push(0, &chunks[0], None, "u/0", |_, _| Ok(()))
            .unwrap();
        let err = stream
            .push(1, &corrupt, None, "u/1", |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chunk-00001.bin") && err.contains("corrupt"),
            "{err}"
        );
        let err = stream
            .push(1, &chunks[1][..100], None, "u/1", |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chunk-00001.bin") && err.contains("truncated"),
            "{err}"
        );
        let err = stream
            .push(2, &chunks[2], None, "u/2", |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("before chunk 1"), "{err}");
    }

    /// A digest the caller computed (the browser's WebCrypto) is checked as a computed one
    /// would be: the manifest's, in either case of hex, passes; another names the chunk.
    #[test]
    fn a_given_digest_is_checked_against_the_manifest() {
        let (manifest, chunks, _) = tiny_bundle(4096);
        let mut stream = ChunkStream::new(manifest.clone());
        let upper = manifest.chunks[0].sha256.to_uppercase();
        stream
            .push(0, &chunks[0], Some(&upper), "u/0", |_, _| Ok(()))
            .unwrap();
        let other = sha256_hex(&chunks[0]);
        let err = stream
            .push(1, &chunks[1], Some(&other), "u/1", |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chunk-00001.bin") && err.contains("corrupt") && err.contains(&other),
            "{err}"
        );
        // Size is still checked: a digest does not vouch for a truncated chunk.
        let right = &manifest.chunks[1].sha256;
        let err = stream
            .push(1, &chunks[1][..100], Some(right), "u/1", |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated"), "{err}");
        stream
            .push(1, &chunks[1], Some(right), "u/1", |_, _| Ok(()))
            .unwrap();
    }

    #[test]
    fn bad_manifests_name_the_field() {
        let (manifest, _, _) = tiny_bundle(4096);
        let good = serde_json::to_value(&manifest).unwrap();
        let check = |edit: &dyn Fn(&mut Value), needle: &str| {
            let mut v = good.clone();
            edit(&mut v);
            let err = Manifest::parse(&v.to_string()).unwrap_err().to_string();
            assert!(err.contains(needle), "expected `{needle}` in: {err}");
        };
        check(&|v| v["version"] = 2.into(), "version");
        check(&|v| v["format"] = "gguf".into(), "format");
        check(
            &|v| {
                v.as_object_mut().unwrap().remove("format");
            },
            "format",
        );
        check(
            &|v| {
                v.as_object_mut().unwrap().remove("chunks");
            },
            "chunks",
        );
        check(&|v| v["quantization"] = "q8".into(), "quantization");
        check(
            &|v| v["tensors"][0]["size"] = 5.into(),
            "model.embed_tokens.weight",
        );
        check(
            &|v| v["tensors"][1]["shape"] = serde_json::json!([47]),
            "[47]",
        );
        check(
            &|v| {
                v["tensors"].as_array_mut().unwrap().pop();
            },
            "lm_head.bias",
        );
        check(
            &|v| {
                let tensors = v["tensors"].as_array_mut().unwrap();
                let at = |name: &str| tensors.iter().position(|t| t["name"] == name).unwrap();
                let (a, b) = (
                    at("model.layers.0.mlp.fc1.weight"),
                    at("model.layers.1.mlp.fc1.weight"),
                );
                tensors[a]["name"] = "model.layers.1.mlp.fc1.weight".into();
                tensors[b]["name"] = "model.layers.0.mlp.fc1.weight".into();
            },
            "comes after layer 1's: a bundle stores its layers in order",
        );
        check(&|v| v["chunks"][0]["sha256"] = "xyz".into(), "sha256");
        check(
            &|v| v["chunks"][0]["file"] = "../etc/passwd".into(),
            "plain file name",
        );
        check(
            &|v| v["chunks"][0]["size"] = (MAX_CHUNK_BYTES + 1).into(),
            "size",
        );
        assert!(Manifest::parse("[1, 2")
            .unwrap_err()
            .to_string()
            .contains("JSON"));
    }
}
