//! Phi (Phi-1/1.5/2) in burn, with the names of transformers' `modeling_phi.py`: the same code
//! runs on every backend (CPU, native wgpu, WebGPU).
//!
//! `PhiDecoderLayer`: `h = h + self_attn(input_layernorm(h)) + mlp(input_layernorm(h))` —
//! attention and MLP in parallel on one shared LayerNorm; `mlp(x) = fc2(gelu_new(fc1(x)))`.
//! Rotary embedding on the first `rotary_dim` dims of each head, rotate-half style. Batch size
//! is 1: hidden states are `[tokens, hidden]`.
//!
//! Because attention and MLP read the same input and their outputs are summed, a layer runs as
//! two matmuls instead of six ([`FusedLinear::of_layer`]): `fc1_qkv` computes `[fc1 | q_proj |
//! k_proj | v_proj]` of the normed input at once, attention replaces `q` with its output, and
//! `fc2_dense` multiplies `[gelu(fc1) | attention]` by `[fc2 | dense]` and adds the residual.
//! On a GPU a decoded token takes three launches per layer (`fc1_qkv` with the LayerNorm
//! inside, attention, `fc2_dense`; four on a software adapter, whose matmul leaves the
//! LayerNorm to its own kernel); on burn's CPU backend the kernels' CPU paths compose tensor
//! ops.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::PhiConfig;
use crate::error::{Error, Result};
use crate::kernels::attention::LayerCache;
use crate::kernels::layer_norm::normed;
use crate::kernels::{Epilogue, KernelOptions, KernelPlan, LayerNorm};
use crate::memory::PREFILL_CHUNK;
use crate::weights::assembler::{mlp_width, FusedLinear, Matrix, Weights};
use crate::weights::names::{LayerParam, Slot};

/// A linear layer `y = x·W + b`, its weight f32 or 4-bit packed.
pub struct Linear {
    weight: Matrix,
    bias: Tensor<1>,
}

impl Linear {
    /// `norm(x)·W + b` (`norm`: a LayerNorm first, or none), then `then`; a 4-bit layer on a
    /// GPU runs the matmul and `then` as one kernel, with the LayerNorm inside where it fits.
    fn forward(
        &self,
        x: Tensor<2>,
        norm: Option<&LayerNorm>,
        then: Epilogue,
        plan: KernelPlan,
    ) -> Tensor<2> {
        match &self.weight {
            Matrix::F32(weight) => {
                let x = normed(x, norm, plan);
                then.apply(x.matmul(weight.clone()) + self.bias.clone().unsqueeze::<2>())
            }
            Matrix::Q4(weight) => weight.matmul(x, norm, &self.bias, then, plan),
        }
    }
}

/// `embed_tokens`. A 4-bit table stays packed where its backend computes (the GPU, or host
/// memory for the CPU backend); a step dequantizes only the rows it looks up.
pub struct Embedding {
    weight: Matrix,
}

impl Embedding {
    fn forward(&self, tokens: &[u32], device: &Device) -> Tensor<2> {
        match &self.weight {
            Matrix::F32(table) => {
                let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
                let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [tokens.len()]), device);
                table.clone().select(0, ids)
            }
            Matrix::Q4(table) => table.rows_of(tokens, device),
        }
    }
}

struct PhiDecoderLayer {
    input_layernorm: LayerNorm,
    /// `[fc1 | 0 | q_proj | k_proj | v_proj]` (see [`mlp_width`]), GELU on the MLP part.
    fc1_qkv: Linear,
    /// `[fc2 | 0 | dense]` over `[gelu(fc1) | 0 | attention]`, plus the residual.
    fc2_dense: Linear,
}

/// `rotary_emb`: cos and sin for every position, `[max_positions, rotary_dim]`, computed the way
/// transformers does (f32 inverse frequencies and angles) so positions match bit for bit.
struct RotaryEmbedding {
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl RotaryEmbedding {
    fn new(config: &PhiConfig, device: &Device) -> Self {
        let dim = config.rotary_dim();
        let positions = config.max_position_embeddings;
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / (config.rope_theta as f32).powf(i as f32 / dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(positions * dim);
        let mut sin = Vec::with_capacity(positions * dim);
        for pos in 0..positions {
            // emb = cat(freqs, freqs)
            for _ in 0..2 {
                for &f in &inv_freq {
                    let angle = pos as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        RotaryEmbedding {
            cos: Tensor::from_data(TensorData::new(cos, [positions, dim]), device),
            sin: Tensor::from_data(TensorData::new(sin, [positions, dim]), device),
        }
    }
}

/// Keys and values of every layer, written in place. A new cache has room for
/// [`FIRST_ALLOCATION`] tokens and grows to the whole context once it needs more, so a short
/// chat does not hold what Phi-2's 2048 tokens take (1.34 GB in f32; 0.17 GB for 256). One
/// growth only: the device's allocator keeps freed memory for reuse rather than handing it back
/// (cubecl's explicit cleanup blocks on the device, which wasm cannot do), so doubling step by
/// step would leave every earlier size held.
pub struct KvCache {
    /// Each layer's, moved out while its attention runs (so that writes can be in place).
    layers: Vec<Option<LayerCache>>,
    len: usize,
    capacity: usize,
}

/// Tokens of the warm-up's prompt: more than the decode kernel takes (`GEMV_MAX_TOKENS`), so that it compiles the prefill kernel most prompts
/// run.
pub const WARM_UP_PROMPT: usize = crate::kernels::q4::GEMV_MAX_TOKENS + 1;

/// Tokens a new cache has room for before it first grows.
pub const FIRST_ALLOCATION: usize = 256;

impl KvCache {
    /// Tokens already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most tokens it can hold (the model's context).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Tokens it has memory for now.
    pub fn allocated(&self) -> usize {
        self.first().map_or(0, |layer| layer.keys.dims()[1])
    }

    /// The element type it holds (see [`KernelPlan::kv_cache_dtype`]).
    pub fn dtype(&self) -> burn::tensor::DType {
        self.first()
            .map_or(burn::tensor::DType::F32, |layer| layer.keys.dtype())
    }

    /// Forgets everything after the first `len` tokens (the memory is reused).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The first layer's, which stands for every layer's allocation.
    fn first(&self) -> Option<&LayerCache> {
        self.layers.first().and_then(Option::as_ref)
    }

    /// Makes room for `tokens` tokens: when the allocation is too small, each layer's keys and
    /// values move to tensors for the whole context, one at a time (at most one old tensor
    /// alive beside the new ones).
    fn reserve(&mut self, tokens: usize) {
        if tokens <= self.allocated() {
            return;
        }
        let size = self.capacity;
        let kept = self.len;
        let grow = |old: Tensor<3>| {
            let [heads, _, head_dim] = old.dims();
            let bigger = Tensor::<3>::zeros([heads, size, head_dim], (&old.device(), old.dtype()));
            match kept {
                0 => bigger,
                _ => bigger.slice_assign([0..heads, 0..kept, 0..head_dim], old.narrow(1, 0, kept)),
            }
        };
        for slot in &mut self.layers {
            let LayerCache { keys, values } = slot
                .take()
                .expect("a layer's cache is in place between steps");
            let keys = grow(keys);
            *slot = Some(LayerCache {
                keys,
                values: grow(values),
            });
        }
    }

    /// Runs `step` on layer `index`'s keys and values, which it hands back.
    fn with_layer(
        &mut self,
        index: usize,
        step: impl FnOnce(LayerCache) -> (Tensor<2>, LayerCache),
    ) -> Tensor<2> {
        let slot = &mut self.layers[index];
        let layer = slot
            .take()
            .expect("a layer's cache is in place between steps");
        let (out, layer) = step(layer);
        *slot = Some(layer);
        out
    }
}

/// Phi for causal language modelling: transformers' `PhiForCausalLM`, its `PhiModel` inlined.
pub struct Phi {
    config: PhiConfig,
    device: Device,
    /// The kernels this model runs (unused on burn's CPU backend).
    plan: KernelPlan,
    /// Columns of the MLP's part of a layer's activations ([`mlp_width`]).
    mlp_width: usize,
    embed_tokens: Embedding,
    layers: Vec<PhiDecoderLayer>,
    final_layernorm: LayerNorm,
    lm_head: Linear,
    rotary_emb: RotaryEmbedding,
    /// Tokens a cache holds at most: the model's context, or less ([`Phi::limit_context`]).
    context_length: usize,
}

impl Phi {
    /// The model on `device` from its assembled weights, with the kernels `options` choose
    /// there (an error when the device cannot run them).
    pub fn from_weights(
        mut weights: Weights,
        device: &Device,
        options: KernelOptions,
    ) -> Result<Self> {
        let plan = KernelPlan::for_device(device, options)?;
        let config = weights.config.clone();
        let layer_norm = |weights: &mut Weights, weight, bias| LayerNorm {
            weight: weights.take(weight),
            bias: weights.take(bias),
            eps: config.layer_norm_eps,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|n| {
                let [fc1_qkv, fc2_dense] = FusedLinear::of_layer(&config).map(|fused| {
                    let (weight, bias) = weights.take_fused(n, &fused, device);
                    Linear { weight, bias }
                });
                PhiDecoderLayer {
                    input_layernorm: layer_norm(
                        &mut weights,
                        Slot::Layer(n, LayerParam::InputLayernormWeight),
                        Slot::Layer(n, LayerParam::InputLayernormBias),
                    ),
                    fc1_qkv,
                    fc2_dense,
                }
            })
            .collect();
        Ok(Phi {
            mlp_width: mlp_width(&config),
            embed_tokens: Embedding {
                weight: weights.take_matrix(Slot::EmbedTokens),
            },
            layers,
            final_layernorm: layer_norm(
                &mut weights,
                Slot::FinalLayernormWeight,
                Slot::FinalLayernormBias,
            ),
            lm_head: Linear {
                weight: weights.take_matrix(Slot::LmHeadWeight),
                bias: weights.take(Slot::LmHeadBias),
            },
            rotary_emb: RotaryEmbedding::new(&config, device),
            context_length: config.max_position_embeddings,
            plan,
            config,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &PhiConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The kernels this model runs.
    pub fn kernel_plan(&self) -> KernelPlan {
        self.plan
    }

    /// Tokens the model attends to: prompt and generated text together.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Caps the context at `tokens` (at most `max_position_embeddings`), and with it what a
    /// full KV cache takes: a device with little memory can run a shorter context.
    pub fn limit_context(&mut self, tokens: usize) -> Result<()> {
        self.context_length = checked_context(&self.config, tokens)?;
        Ok(())
    }

    /// A cache for up to the whole context ([`Phi::context_length`] tokens), with memory for
    /// [`FIRST_ALLOCATION`] of them to start with, in f32 or, where the plan says, f16.
    pub fn new_cache(&self) -> KvCache {
        self.cache_for(self.config.num_hidden_layers)
    }

    /// [`Phi::new_cache`] for the first `layers` layers.
    fn cache_for(&self, layers: usize) -> KvCache {
        let heads = self.config.num_attention_heads;
        let head_dim = self.config.head_dim();
        let capacity = self.context_length;
        let allocated = FIRST_ALLOCATION.min(capacity);
        let dtype = self.plan.kv_cache_dtype();
        let empty = || Tensor::<3>::zeros([heads, allocated, head_dim], (&self.device, dtype));
        KvCache {
            layers: (0..layers)
                .map(|_| {
                    Some(LayerCache {
                        keys: empty(),
                        values: empty(),
                    })
                })
                .collect(),
            len: 0,
            capacity,
        }
    }

    /// Runs `tokens` after what the cache holds and returns the logits of the last one,
    /// `[1, vocab_size]`, in steps of at most [`PREFILL_CHUNK`] tokens (which bounds a step's
    /// activations). Callers check that the tokens fit in the cache.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Tensor<2> {
        self.forward_in_steps(tokens, PREFILL_CHUNK, cache)
    }

    /// [`Phi::forward`] in steps of at most `step` tokens.
    pub fn forward_in_steps(&self, tokens: &[u32], step: usize, cache: &mut KvCache) -> Tensor<2> {
        let mut steps = tokens.chunks(step.max(1)).peekable();
        loop {
            let chunk = steps.next().expect("forward: no tokens");
            // An earlier step's logits are dropped unread: only its keys and values matter.
            let logits = self.forward_through(self.layers.len(), chunk, cache);
            if steps.peek().is_none() {
                return logits;
            }
        }
    }

    /// Compiles the model's kernels for a prompt and a decoded token (the package's warm-up
    /// also picks a greedy token from the logits, compiling that step's few) for a small part
    /// of their work: a prompt of [`WARM_UP_PROMPT`] tokens then one token through the first
    /// layer only (every layer runs the same kernels), the final LayerNorm and lm_head. On a
    /// software adapter one token through the whole model takes seconds. The logits,
    /// `[1, vocab_size]`, are those of that truncated model; nothing is kept.
    pub fn warm_up(&self) -> Tensor<2> {
        let mut cache = self.cache_for(1);
        // Token 0: every vocabulary has it.
        self.forward_through(1, &[0; WARM_UP_PROMPT], &mut cache);
        self.forward_through(1, &[0], &mut cache)
    }

    /// [`Phi::forward`] through the first `layers` layers (the cache has at least as many).
    fn forward_through(&self, layers: usize, tokens: &[u32], cache: &mut KvCache) -> Tensor<2> {
        assert!(
            layers <= self.layers.len() && layers <= cache.layers.len(),
            "forward: {layers} layers with a model of {} and a cache of {}",
            self.layers.len(),
            cache.layers.len()
        );
        assert!(
            !tokens.is_empty() && cache.len + tokens.len() <= cache.capacity,
            "forward: {} tokens after {} do not fit a cache of {}",
            tokens.len(),
            cache.len,
            cache.capacity
        );
        let start = cache.len;
        let count = tokens.len();
        cache.reserve(start + count);
        let plan = self.plan;
        let rotary = [&self.rotary_emb.cos, &self.rotary_emb.sin];
        let scale = (1.0 / (self.config.head_dim() as f64).sqrt()) as f32;
        let attention_width = self.mlp_width + self.config.hidden_size;
        let mut hidden_states = self.embed_tokens.forward(tokens, &self.device);
        for (index, layer) in self.layers.iter().take(layers).enumerate() {
            let mlp = Epilogue {
                gelu_outputs: self.mlp_width,
                residual: None,
            };
            let norm = Some(&layer.input_layernorm);
            let fc1_qkv = layer
                .fc1_qkv
                .forward(hidden_states.clone(), norm, mlp, plan);
            // Attention's output replaces the queries: `[gelu(fc1) | 0 | attention | k | v]`.
            let attended = cache.with_layer(index, |layer_cache| {
                let q_at = self.mlp_width;
                crate::kernels::attention(fc1_qkv, q_at, layer_cache, rotary, start, scale, plan)
            });
            let residual = Epilogue {
                gelu_outputs: 0,
                residual: Some(hidden_states),
            };
            hidden_states = layer.fc2_dense.forward(
                attended.narrow(1, 0, attention_width),
                None,
                residual,
                plan,
            );
        }
        cache.len = start + count;
        let last = hidden_states.narrow(0, count - 1, 1);
        let norm = Some(&self.final_layernorm);
        self.lm_head.forward(last, norm, Epilogue::default(), plan)
    }
}

/// `tokens` as a context length for a model of `config`: at least one token, at most its
/// `max_position_embeddings`.
pub fn checked_context(config: &PhiConfig, tokens: usize) -> Result<usize> {
    let max = config.max_position_embeddings;
    if tokens == 0 || tokens > max {
        return Err(Error::option(
            "context_length",
            format!("{tokens} is not between 1 and the model's {max} tokens"),
        ));
    }
    Ok(tokens)
}
