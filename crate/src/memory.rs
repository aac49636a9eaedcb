//! What a model needs of its device's memory, known from the manifest before anything is
//! downloaded: the weights as the model holds them (a layer's projections fused, 4-bit or f32
//! as they arrive), the KV cache for a context length, and a prompt step's activations. The
//! package's `requirements()` and its load check these figures against the adapter's limits;
//! `phi2 bench` prints them beside what the device's allocator ends up holding.

use burn::tensor::Device;
use cubecl::{MemoryReport, MemoryScope, MemoryUsage};
use serde::Serialize;

use crate::config::PhiConfig;
use crate::kernels::client_of;
use crate::quant::{padded_cols, BLOCK};
use crate::weights::assembler::{mlp_width, FusedLinear};
use crate::weights::bundle::{Manifest, TensorDtype};
use crate::weights::names::{LayerParam, Slot};

/// Prompt tokens one forward pass takes at most: a longer prompt runs in steps of this many,
/// so that a step's attention scores (`heads × tokens × context` f32) stay within WebGPU's
/// default largest binding (128 MiB) for Phi-2 at its full context (64 MiB).
pub const PREFILL_CHUNK: usize = 256;

/// Device memory a model needs, in bytes.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryNeeds {
    /// Weights and the rotary tables.
    pub weights_bytes: u64,
    /// Keys and values of every layer for `context_length` tokens.
    pub kv_cache_bytes: u64,
    /// The largest step's activations (a prompt step of [`PREFILL_CHUNK`] tokens at the end of
    /// the context) and the logits.
    pub activations_bytes: u64,
    pub total_bytes: u64,
    pub context_length: usize,
    /// "f32" or "f16".
    pub kv_cache_dtype: &'static str,
    /// The largest single buffer, which the adapter's `maxBufferSize` and
    /// `maxStorageBufferBindingSize` must allow.
    pub largest_buffer: Buffer,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Buffer {
    pub name: String,
    pub bytes: u64,
}

/// Buffers in bytes, each named, whose sizes add up to a total.
#[derive(Default)]
struct Buffers(Vec<Buffer>);

impl Buffers {
    fn add(&mut self, name: impl Into<String>, bytes: usize) {
        self.0.push(Buffer {
            name: name.into(),
            bytes: bytes as u64,
        });
    }

    /// A matrix's buffers: 4-bit codes and scales as the kernels read them, or f32 values.
    fn matrix(&mut self, name: &str, rows: usize, cols: usize, q4: bool) {
        if q4 {
            let blocks = padded_cols(cols) / BLOCK;
            self.add(
                format!("{name} (4-bit codes)"),
                rows * padded_cols(cols) / 2,
            );
            self.add(format!("{name} (scales)"), rows * blocks.div_ceil(2) * 4);
        } else {
            self.add(name, rows * cols * 4);
        }
    }

    fn total(&self) -> u64 {
        self.0.iter().map(|b| b.bytes).sum()
    }

    fn largest(&self) -> Option<&Buffer> {
        self.0.iter().max_by_key(|b| b.bytes)
    }
}

/// The memory the model in `manifest` needs with a context of `context_length` tokens (at most
/// the model's), its KV cache in f16 or f32.
pub fn memory_needs(manifest: &Manifest, context_length: usize, kv_cache_f16: bool) -> MemoryNeeds {
    let config = &manifest.config;
    let is_q4 = |slot: Slot| {
        let name = slot.hf_name();
        manifest
            .tensors
            .iter()
            .any(|t| t.name == name && t.dtype == TensorDtype::Q4)
    };
    let weights = weight_buffers(config, is_q4);
    let context = context_length.min(config.max_position_embeddings);
    let kv_bytes = if kv_cache_f16 { 2 } else { 4 };
    let mut kv_cache = Buffers::default();
    for layer in 0..config.num_hidden_layers {
        let size = config.num_attention_heads * context * config.head_dim() * kv_bytes;
        kv_cache.add(format!("layer {layer} keys"), size);
        kv_cache.add(format!("layer {layer} values"), size);
    }
    let activations = activation_buffers(config, PREFILL_CHUNK.min(context), context);
    let largest = [&weights, &kv_cache, &activations]
        .into_iter()
        .filter_map(Buffers::largest)
        .max_by_key(|b| b.bytes)
        .cloned()
        .unwrap_or(Buffer {
            name: String::new(),
            bytes: 0,
        });
    let (weights_bytes, kv_cache_bytes, activations_bytes) =
        (weights.total(), kv_cache.total(), activations.total());
    MemoryNeeds {
        weights_bytes,
        kv_cache_bytes,
        activations_bytes,
        total_bytes: weights_bytes + kv_cache_bytes + activations_bytes,
        context_length: context,
        kv_cache_dtype: if kv_cache_f16 { "f16" } else { "f32" },
        largest_buffer: largest,
    }
}

/// The model's parameters as [`crate::Phi::from_weights`] holds them; `is_q4` says which
/// arrive 4-bit (a layer's matmul is 4-bit when all its parts are).
fn weight_buffers(config: &PhiConfig, is_q4: impl Fn(Slot) -> bool) -> Buffers {
    let (hidden, vocab) = (config.hidden_size, config.vocab_size);
    let mut buffers = Buffers::default();
    buffers.matrix(
        "model.embed_tokens.weight",
        vocab,
        hidden,
        is_q4(Slot::EmbedTokens),
    );
    for layer in 0..config.num_hidden_layers {
        let norm = |param: LayerParam| Slot::Layer(layer, param).hf_name();
        buffers.add(norm(LayerParam::InputLayernormWeight), hidden * 4);
        buffers.add(norm(LayerParam::InputLayernormBias), hidden * 4);
        for (fused, name) in FusedLinear::of_layer(config)
            .iter()
            .zip(["fc1_qkv", "fc2_dense"])
        {
            let q4 = fused
                .parts
                .iter()
                .all(|part| is_q4(Slot::Layer(layer, part.weight)));
            let name = format!("model.layers.{layer}.{name}");
            buffers.matrix(&name, fused.rows, fused.cols, q4);
            buffers.add(format!("{name} bias"), fused.rows * 4);
        }
    }
    buffers.add("model.final_layernorm.weight", hidden * 4);
    buffers.add("model.final_layernorm.bias", hidden * 4);
    buffers.matrix("lm_head.weight", vocab, hidden, is_q4(Slot::LmHeadWeight));
    buffers.add("lm_head.bias", vocab * 4);
    let rotary = config.max_position_embeddings * config.rotary_dim() * 4;
    buffers.add("rotary cos", rotary);
    buffers.add("rotary sin", rotary);
    buffers
}

/// What a step of `tokens` new tokens ending at position `context` holds at once, at its
/// peak (attention): the hidden states, their LayerNorm, the residual, `fc1_qkv`'s output and
/// the attention scores; then the last token's logits with a constraint's bias beside them.
fn activation_buffers(config: &PhiConfig, tokens: usize, context: usize) -> Buffers {
    let hidden = config.hidden_size;
    let mut buffers = Buffers::default();
    for name in ["hidden states", "normed hidden states", "residual"] {
        buffers.add(name, tokens * hidden * 4);
    }
    buffers.add(
        "fc1_qkv output",
        tokens * (mlp_width(config) + 3 * hidden) * 4,
    );
    buffers.add(
        "attention scores",
        config.num_attention_heads * tokens * context * 4,
    );
    buffers.add("logits", config.vocab_size * 4);
    buffers.add("logit bias", config.vocab_size * 4);
    buffers
}

/// What the device's allocator holds now, pool by pool (`None` on burn's CPU backend).
pub fn device_memory(device: &Device) -> Option<MemoryReport> {
    client_of(device).map(|client| client.memory_report(MemoryScope::Device))
}

/// [`device_memory`] summed over every pool. Freed memory stays pooled for reuse, so after a
/// run `bytes_reserved` is also the run's peak.
pub fn device_memory_usage(device: &Device) -> Option<MemoryUsage> {
    device_memory(device).map(|report| report.usage())
}
