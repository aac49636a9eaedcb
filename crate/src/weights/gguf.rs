//! GGUF (llama.cpp) files: a reader that cannot be crashed by its input, the ggml block
//! formats that published Phi-2 files use, and the phi2 metadata → config and tokenizer.
//!
//! Every length and offset read from the file is checked against the bytes actually present
//! before anything is allocated or sliced.

use std::collections::BTreeMap;

use half::{bf16, f16};
use serde_json::{json, Value};

use crate::config::PhiConfig;
use crate::error::{Error, Result};
use crate::quant::{padded_cols, Q4Matrix};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: usize = 4;

#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Int(i128),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            MetaValue::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            MetaValue::Float(v) => Some(*v),
            MetaValue::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// The ggml tensor types this reader decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (values per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    pub name: String,
    /// Row-major shape, outermost first (GGUF's `ne` reversed): linear weights are `[out, in]`.
    pub shape: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Byte range inside the file.
    pub start: usize,
    pub len: usize,
}

pub struct Gguf<'a> {
    pub file: String,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<GgufTensor>,
    bytes: &'a [u8],
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    file: &'a str,
}

impl<'a> Cursor<'a> {
    fn fail(&self, what: &str) -> Error {
        Error::format(self.file, format!("{what} (at byte {})", self.pos))
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n > remaining {
            return Err(self.fail(&format!("{what}: needs {n} bytes, only {remaining} left")));
        }
        let out = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.fail(&format!("{what}: not UTF-8")))
    }

    fn value(&mut self, kind: u32, key: &str, depth: usize) -> Result<MetaValue> {
        let int = |v: i128| Ok(MetaValue::Int(v));
        match kind {
            0 => int(self.array::<1>(key)?[0] as i128),
            1 => int(self.array::<1>(key)?[0] as i8 as i128),
            2 => int(u16::from_le_bytes(self.array(key)?) as i128),
            3 => int(i16::from_le_bytes(self.array(key)?) as i128),
            4 => int(self.u32(key)? as i128),
            5 => int(i32::from_le_bytes(self.array(key)?) as i128),
            6 => Ok(MetaValue::Float(f32::from_le_bytes(self.array(key)?) as f64)),
            7 => Ok(MetaValue::Bool(self.array::<1>(key)?[0] != 0)),
            8 => Ok(MetaValue::Str(self.string(key)?)),
            9 if depth == 0 => {
                let item_kind = self.u32(key)?;
                let count = self.u64(key)?;
                // Every item takes at least one byte: a count beyond the file is a lie.
                if count > (self.bytes.len() - self.pos) as u64 {
                    return Err(self.fail(&format!(
                        "metadata `{key}`: array of {count} items cannot fit"
                    )));
                }
                let items = (0..count)
                    .map(|_| self.value(item_kind, key, depth + 1))
                    .collect::<Result<Vec<_>>>()?;
                Ok(MetaValue::Array(items))
            }
            10 => int(self.u64(key)? as i128),
            11 => int(i64::from_le_bytes(self.array(key)?) as i128),
            12 => Ok(MetaValue::Float(f64::from_le_bytes(self.array(key)?))),
            other => Err(self.fail(&format!("metadata `{key}`: unknown value type {other}"))),
        }
    }
}

impl<'a> Gguf<'a> {
    pub fn parse(bytes: &'a [u8], file: &'a str) -> Result<Self> {
        let mut c = Cursor {
            bytes,
            pos: 0,
            file,
        };
        if &c.array::<4>("magic")? != MAGIC {
            return Err(Error::format(file, "not a GGUF file (bad magic)"));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(
                file,
                format!("GGUF version {version} is not supported (2 or 3)"),
            ));
        }
        let tensor_count = c.u64("tensor count")?;
        let kv_count = c.u64("metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = c.string("metadata key")?;
            let kind = c.u32(&key)?;
            let value = c.value(kind, &key, 0)?;
            metadata.insert(key, value);
        }
        // Each tensor header takes at least 28 bytes.
        if tensor_count > (bytes.len() - c.pos) as u64 / 28 {
            return Err(c.fail(&format!("{tensor_count} tensors cannot fit in the file")));
        }
        let mut infos = Vec::new();
        for _ in 0..tensor_count {
            let name = c.string("tensor name")?;
            let dims = c.u32(&name)? as usize;
            if dims == 0 || dims > MAX_DIMS {
                return Err(c.fail(&format!("tensor `{name}`: {dims} dimensions")));
            }
            let mut shape = (0..dims)
                .map(|_| c.u64(&name).map(|d| d as usize))
                .collect::<Result<Vec<_>>>()?;
            shape.reverse();
            let code = c.u32(&name)?;
            let ggml_type = GgmlType::from_code(code).ok_or_else(|| {
                Error::format(file, format!("tensor `{name}`: ggml type {code} is not supported (F32, F16, BF16, Q4_0, Q8_0, Q4_K, Q5_K, Q6_K are)"))
            })?;
            let offset = c.u64(&name)?;
            infos.push((name, shape, ggml_type, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(MetaValue::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT)
            .max(1);
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = Vec::new();
        for (name, shape, ggml_type, offset) in infos {
            let (per_block, block_bytes) = ggml_type.block();
            let row = *shape.last().expect("dims > 0");
            let values = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            let len = values
                .filter(|_| row % per_block == 0)
                .and_then(|v| (v / per_block).checked_mul(block_bytes));
            let len = len.ok_or_else(|| {
                Error::format(
                    file,
                    format!("tensor `{name}`: shape {shape:?} does not fit {ggml_type:?} blocks"),
                )
            })?;
            let start = data_start.checked_add(offset).filter(|s| {
                s.checked_add(len as u64)
                    .is_some_and(|end| end <= bytes.len() as u64)
            });
            let start = start.ok_or_else(|| {
                Error::format(file, format!("tensor `{name}`: its {len} bytes at offset {offset} lie beyond the end of the file"))
            })? as usize;
            tensors.push(GgufTensor {
                name,
                shape,
                ggml_type,
                start,
                len,
            });
        }
        Ok(Gguf {
            file: file.to_string(),
            metadata,
            tensors,
            bytes,
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn data(&self, t: &GgufTensor) -> &'a [u8] {
        &self.bytes[t.start..t.start + t.len]
    }

    /// The tensor's values, row-major, as ggml dequantizes them.
    pub fn dequantize(&self, t: &GgufTensor) -> Vec<f32> {
        let data = self.data(t);
        let (per_block, block_bytes) = t.ggml_type.block();
        let mut out = Vec::with_capacity(data.len() / block_bytes * per_block);
        for block in data.chunks_exact(block_bytes) {
            match t.ggml_type {
                GgmlType::F32 => out.push(f32::from_le_bytes(block.try_into().unwrap())),
                GgmlType::F16 => out.push(f16::from_le_bytes([block[0], block[1]]).to_f32()),
                GgmlType::BF16 => out.push(bf16::from_le_bytes([block[0], block[1]]).to_f32()),
                GgmlType::Q4_0 => {
                    let d = half(block, 0);
                    let codes = q4_0_codes(block);
                    out.extend(codes.iter().map(|&q| (q as f32 - 8.0) * d));
                }
                GgmlType::Q8_0 => {
                    let d = half(block, 0);
                    out.extend(block[2..].iter().map(|&q| q as i8 as f32 * d));
                }
                GgmlType::Q4K => dequantize_q4k(block, &mut out),
                GgmlType::Q5K => dequantize_q5k(block, &mut out),
                GgmlType::Q6K => dequantize_q6k(block, &mut out),
            }
        }
        out
    }

    /// A Q4_0 matrix carried over without requantizing: same codes, same f16 scales.
    pub fn q4_0_matrix(&self, t: &GgufTensor) -> Option<Q4Matrix> {
        if t.ggml_type != GgmlType::Q4_0 || t.shape.len() != 2 {
            return None;
        }
        let (rows, cols) = (t.shape[0], t.shape[1]);
        debug_assert_eq!(padded_cols(cols), cols);
        let mut codes = vec![0u32; rows * cols / 8];
        let mut scales = Vec::with_capacity(rows * cols / 32);
        for (b, block) in self.data(t).chunks_exact(18).enumerate() {
            scales.push(f16::from_le_bytes([block[0], block[1]]));
            for (j, q) in q4_0_codes(block).into_iter().enumerate() {
                let index = b * 32 + j;
                codes[index / 8] |= (q as u32) << (4 * (index % 8));
            }
        }
        Some(Q4Matrix {
            rows,
            cols,
            codes,
            scales,
        })
    }

    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        self.metadata
            .get(key)
            .and_then(MetaValue::as_u64)
            .ok_or_else(|| {
                Error::format(
                    &self.file,
                    format!("metadata `{key}` is missing or not an integer"),
                )
            })
    }

    /// The model config from `phi2.*` metadata; any other architecture is refused.
    pub fn phi_config(&self) -> Result<PhiConfig> {
        match self
            .metadata
            .get("general.architecture")
            .and_then(MetaValue::as_str)
        {
            Some("phi2") => {}
            other => {
                return Err(Error::format(
                    &self.file,
                    format!("general.architecture is {other:?}; only `phi2` can be converted"),
                ))
            }
        }
        let hidden = self.meta_u64("phi2.embedding_length")? as usize;
        let heads = self.meta_u64("phi2.attention.head_count")? as usize;
        let kv_heads = self
            .metadata
            .get("phi2.attention.head_count_kv")
            .and_then(MetaValue::as_u64);
        if kv_heads.is_some_and(|kv| kv as usize != heads) {
            return Err(Error::format(&self.file, "phi2.attention.head_count_kv differs from head_count: grouped-query attention is not supported"));
        }
        let rotary = self.meta_u64("phi2.rope.dimension_count")? as f64;
        let embedding = self
            .tensor("token_embd.weight")
            .ok_or_else(|| Error::MissingTensor {
                name: "token_embd.weight".into(),
            })?;
        let config = PhiConfig {
            vocab_size: embedding.shape[0],
            hidden_size: hidden,
            intermediate_size: self.meta_u64("phi2.feed_forward_length")? as usize,
            num_hidden_layers: self.meta_u64("phi2.block_count")? as usize,
            num_attention_heads: heads,
            max_position_embeddings: self.meta_u64("phi2.context_length")? as usize,
            layer_norm_eps: self
                .metadata
                .get("phi2.attention.layer_norm_epsilon")
                .and_then(MetaValue::as_f64)
                .unwrap_or(1e-5),
            rope_theta: self
                .metadata
                .get("phi2.rope.freq_base")
                .and_then(MetaValue::as_f64)
                .unwrap_or(10000.0),
            partial_rotary_factor: if heads > 0 && hidden > 0 {
                rotary / (hidden / heads) as f64
            } else {
                0.0
            },
            eos_token_id: self
                .metadata
                .get("tokenizer.ggml.eos_token_id")
                .and_then(MetaValue::as_u64)
                .map(|v| v as u32),
        };
        config.validate()?;
        Ok(config)
    }

    /// A `tokenizer.json` rebuilt from `tokenizer.ggml.*` (GPT-2 byte-level BPE).
    pub fn tokenizer_json(&self) -> Result<Vec<u8>> {
        let fail = |what: &str| Error::format(&self.file, format!("tokenizer metadata: {what}"));
        let strings = |key: &str| -> Result<Vec<&str>> {
            match self.metadata.get(key) {
                Some(MetaValue::Array(items)) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .ok_or_else(|| fail(&format!("`{key}` holds a non-string")))
                    })
                    .collect(),
                _ => Err(fail(&format!("`{key}` is missing"))),
            }
        };
        match self
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(MetaValue::as_str)
        {
            Some("gpt2") => {}
            other => {
                return Err(fail(&format!(
                    "tokenizer.ggml.model is {other:?}, not `gpt2`"
                )))
            }
        }
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match self.metadata.get("tokenizer.ggml.token_type") {
            Some(MetaValue::Array(items)) => {
                items.iter().map(|v| v.as_u64().unwrap_or(1)).collect()
            }
            _ => vec![1; tokens.len()],
        };
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        for (id, token) in tokens.iter().enumerate() {
            // ggml token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
            // Unused ones ("[PAD50295]"…, llama.cpp's padding of the list to the model's rows)
            // are left out, as Hugging Face's tokenizer has no such ids: they decode to nothing
            // and no text or grammar can produce them.
            let kind = types.get(id).copied().unwrap_or(1);
            if kind == 5 {
                continue;
            }
            // Every other token goes into the BPE vocab at its own id: `tokenizers` ignores the
            // id an added token is given and numbers one the vocab lacks after the vocab's
            // count. Control and user-defined tokens are also added tokens, matched in text
            // before BPE runs, as Hugging Face's are.
            if let Some(first) = vocab.insert(token.to_string(), json!(id)) {
                return Err(fail(&format!(
                    "token {token:?} is listed twice, as ids {first} and {id}"
                )));
            }
            if kind == 3 || kind == 4 {
                let special = kind == 3;
                added.push(
                    json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": !special, "special": special}),
                );
            }
        }
        let byte_level = |trim: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": trim, "use_regex": true});
        let tokenizer: Value = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": byte_level(true), "post_processor": byte_level(false),
            "decoder": byte_level(false),
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges}
        });
        Ok(serde_json::to_vec(&tokenizer).expect("JSON serializes"))
    }
}

fn half(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// The 32 codes of a Q4_0 block: byte i holds element i (low nibble) and i + 16 (high).
fn q4_0_codes(block: &[u8]) -> [u8; 32] {
    let mut codes = [0u8; 32];
    for (i, &b) in block[2..18].iter().enumerate() {
        codes[i] = b & 0xF;
        codes[i + 16] = b >> 4;
    }
    codes
}

/// Scale and min of sub-block `j` from the 12 packed bytes of a Q4_K/Q5_K block (6 bits each).
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (d, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (d as f32, m as f32)
}

/// Q4_K: d, dmin (f16), 12 bytes of scales/mins, 128 bytes of nibbles; 8 sub-blocks of 32.
fn dequantize_q4k(block: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half(block, 0), half(block, 2));
    let scales = &block[4..16];
    let qs = &block[16..144];
    for (pair, q) in qs.chunks_exact(32).enumerate() {
        let (s1, m1) = scale_min_k4(2 * pair, scales);
        let (s2, m2) = scale_min_k4(2 * pair + 1, scales);
        out.extend(q.iter().map(|&b| d * s1 * (b & 0xF) as f32 - dmin * m1));
        out.extend(q.iter().map(|&b| d * s2 * (b >> 4) as f32 - dmin * m2));
    }
}

/// Q5_K: as Q4_K plus a fifth bit per value from 32 bytes of `qh`.
fn dequantize_q5k(block: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half(block, 0), half(block, 2));
    let scales = &block[4..16];
    let qh = &block[16..48];
    let qs = &block[48..176];
    for (pair, q) in qs.chunks_exact(32).enumerate() {
        let (s1, m1) = scale_min_k4(2 * pair, scales);
        let (s2, m2) = scale_min_k4(2 * pair + 1, scales);
        let (bit1, bit2) = (1u8 << (2 * pair), 2u8 << (2 * pair));
        let high = |l: usize, bit: u8| if qh[l] & bit != 0 { 16.0 } else { 0.0 };
        out.extend(
            q.iter()
                .enumerate()
                .map(|(l, &b)| d * s1 * ((b & 0xF) as f32 + high(l, bit1)) - dmin * m1),
        );
        out.extend(
            q.iter()
                .enumerate()
                .map(|(l, &b)| d * s2 * ((b >> 4) as f32 + high(l, bit2)) - dmin * m2),
        );
    }
}

/// Q6_K: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 i8 scales, then f16 d.
fn dequantize_q6k(block: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, sc) = (&block[0..128], &block[128..192], &block[192..208]);
    let d = half(block, 208);
    for half_block in 0..2 {
        let (ql, qh, sc) = (
            &ql[64 * half_block..],
            &qh[32 * half_block..],
            &sc[8 * half_block..],
        );
        let mut values = [0.0f32; 128];
        for l in 0..32 {
            let is = l / 16;
            let q = |low: u8, shift: u8| ((low | (((qh[l] >> shift) & 3) << 4)) as i32 - 32) as f32;
            values[l] = d * sc[is] as i8 as f32 * q(ql[l] & 0xF, 0);
            values[l + 32] = d * sc[is + 2] as i8 as f32 * q(ql[l + 32] & 0xF, 2);
            values[l + 64] = d * sc[is + 4] as i8 as f32 * q(ql[l] >> 4, 4);
            values[l + 96] = d * sc[is + 6] as i8 as f32 * q(ql[l + 32] >> 4, 6);
        }
        out.extend_from_slice(&values);
    }
}
