//! Phi (Phi-1/1.5/2) in burn: the same code runs on every backend (CPU, native wgpu, WebGPU).
//!
//! One decoder layer: `h = h + dense(attn(ln(h))) + fc2(gelu_tanh(fc1(ln(h))))` — attention and
//! MLP in parallel on one shared LayerNorm. Rotary embedding on the first `rotary_dim` dims of each
//! head, rotate-half style. Batch size is 1: hidden states are `[tokens, hidden]`.
//!
//! Because attention and MLP read the same input and their outputs are summed, a layer runs as
//! two matmuls instead of six: `fan_out` computes `[fc1 | q | k | v]` of the normed input at
//! once, attention replaces `q` with its output, and `fan_in` multiplies `[gelu(fc1) | attn]`
//! by `[fc2 | dense]` and adds the residual. On a GPU a decoded token takes five launches per
//! layer (LayerNorm, `fan_out`, two attention kernels, `fan_in`).

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::config::PhiConfig;
use crate::kernels::{Epilogue, KernelPlan, Q4Weight};
use crate::quant::PLACEMENT_COLS;
use crate::weights::safetensors::Weights;
use crate::weights::{LayerParam, Slot};

/// Added to masked attention scores. Large and finite: WGSL does not promise IEEE infinities.
const MASKED: f32 = -1.0e9;

/// A linear layer `y = x·W + b`, its weight either f32 or 4-bit packed.
#[allow(clippy::large_enum_variant)] // a few per model, not worth a box
pub enum Linear {
    /// `weight`: `[in, out]`
    Dense {
        weight: Tensor<2>,
        bias: Tensor<1>,
    },
    Q4 {
        weight: Q4Weight,
        bias: Tensor<1>,
    },
}

impl Linear {
    /// `x·W + b`, then `then`; a 4-bit layer on a GPU runs it all as one kernel.
    fn forward(&self, x: Tensor<2>, then: Epilogue) -> Tensor<2> {
        match self {
            Linear::Dense { weight, bias } => {
                then.apply(x.matmul(weight.clone()) + bias.clone().unsqueeze::<2>())
            }
            Linear::Q4 { weight, bias } => weight.matmul(x, bias, then),
        }
    }

    /// One f32 layer of `outputs × inputs` made of f32 `parts` (`[in, out]` each) at
    /// `(output, input)` offsets, zeros elsewhere, with `bias`; see [`FusedLinear`]. For
    /// checkpoints that mix 4-bit and f32 tensors (a GGUF file's k-quants are read as f32);
    /// the weight assembler fuses all-4-bit parts itself, on the host.
    pub(crate) fn assemble_dense(
        outputs: usize,
        inputs: usize,
        parts: Vec<(Tensor<2>, usize, usize)>,
        bias: Tensor<1>,
        device: &Device,
    ) -> Linear {
        let mut weight = Tensor::<2>::zeros([inputs, outputs], device);
        for (part, row, col) in parts {
            let [part_inputs, part_outputs] = part.dims();
            weight = weight.slice_assign([col..col + part_inputs, row..row + part_outputs], part);
        }
        Linear::Dense { weight, bias }
    }
}

/// One of the two matmuls a layer runs (see the module docs): `rows × cols`, made of
/// projections `(weight, bias, row, col)` placed at `(row, col)`, zeros elsewhere. Parts side
/// by side along the rows (outputs) compute their projections at once; parts side by side
/// along the columns (inputs) sum their projections of the inputs laid side by side the same
/// way. 4-bit parts start on [`PLACEMENT_COLS`] columns.
pub struct FusedLinear {
    pub rows: usize,
    pub cols: usize,
    pub parts: Vec<(LayerParam, LayerParam, usize, usize)>,
}

impl FusedLinear {
    /// A layer's `[fan_out, fan_in]`: `[fc1 | q | k | v]` stacked along the outputs (the MLP
    /// part [`mlp_width`] rows), and `[fc2 | dense]` side by side along the inputs.
    pub fn of_layer(config: &PhiConfig) -> [FusedLinear; 2] {
        use LayerParam::*;
        let hidden = config.hidden_size;
        let mlp = mlp_width(config);
        [
            FusedLinear {
                rows: mlp + 3 * hidden,
                cols: hidden,
                parts: vec![
                    (Fc1Weight, Fc1Bias, 0, 0),
                    (QWeight, QBias, mlp, 0),
                    (KWeight, KBias, mlp + hidden, 0),
                    (VWeight, VBias, mlp + 2 * hidden, 0),
                ],
            },
            FusedLinear {
                rows: hidden,
                cols: mlp + hidden,
                parts: vec![(Fc2Weight, Fc2Bias, 0, 0), (DenseWeight, DenseBias, 0, mlp)],
            },
        ]
    }
}

/// The MLP's width rounded up to whole [`PLACEMENT_COLS`], so that the attention part after it
/// in a fused layer starts on 4-bit blocks' boundaries (Phi-2's 10240 already does).
fn mlp_width(config: &PhiConfig) -> usize {
    config.intermediate_size.next_multiple_of(PLACEMENT_COLS)
}

/// The token embedding table. A 4-bit table stays packed where its backend computes (the GPU,
/// or host memory for the CPU backend); a step dequantizes only the rows it looks up.
#[allow(clippy::large_enum_variant)] // a few per model, not worth a box
pub enum Embedding {
    Dense(Tensor<2>),
    Q4(Q4Weight),
}

impl Embedding {
    fn forward(&self, tokens: &[u32], device: &Device) -> Tensor<2> {
        match self {
            Embedding::Dense(table) => {
                let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
                let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [tokens.len()]), device);
                table.clone().select(0, ids)
            }
            Embedding::Q4(table) => table.rows_of(tokens, device),
        }
    }
}

pub struct LayerNorm {
    weight: Tensor<1>,
    bias: Tensor<1>,
    eps: f64,
    /// How the GPU kernel runs; `None` on burn's CPU backend.
    plan: Option<KernelPlan>,
}

impl LayerNorm {
    /// One kernel on GPU backends; tensor ops on burn's CPU backend.
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        if let Some(plan) = self.plan {
            return crate::kernels::layer_norm(x, &self.weight, &self.bias, self.eps, plan);
        }
        let (var, mean) = x.clone().var_mean_bias(1);
        let normed = (x - mean) / (var + self.eps).sqrt();
        normed * self.weight.clone().unsqueeze::<2>() + self.bias.clone().unsqueeze::<2>()
    }
}

struct DecoderLayer {
    norm: LayerNorm,
    /// `[fc1 | 0 | q | k | v]` (see [`Phi::mlp_width`]), GELU on the MLP part.
    fan_out: Linear,
    /// `[fc2 | 0 | dense]` over `[gelu(fc1) | 0 | attention]`.
    fan_in: Linear,
}

/// Rotary tables for every position, `[max_positions, rotary_dim]`, computed the way
/// transformers does (f32 inverse frequencies and angles) so positions match bit for bit.
struct Rotary {
    cos: Tensor<2>,
    sin: Tensor<2>,
    dim: usize,
}

impl Rotary {
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
        Rotary {
            cos: Tensor::from_data(TensorData::new(cos, [positions, dim]), device),
            sin: Tensor::from_data(TensorData::new(sin, [positions, dim]), device),
            dim,
        }
    }

    /// A projection's output `[tokens, heads·head_dim]` as `[heads, tokens, head_dim]`, rotated
    /// (when `rotate`) for positions `start..start + tokens`, with tensor ops (burn's CPU
    /// backend; GPU backends rotate inside the attention kernel).
    fn split_heads(&self, x: Tensor<2>, heads: usize, start: usize, rotate: bool) -> Tensor<3> {
        let [count, hidden] = x.dims();
        let split = x.reshape([count, heads, hidden / heads]).swap_dims(0, 1);
        if rotate {
            self.apply(split, start)
        } else {
            split
        }
    }

    /// `x`: `[heads, tokens, head_dim]` for positions `start..start + tokens`.
    fn apply(&self, x: Tensor<3>, start: usize) -> Tensor<3> {
        let [_, tokens, head_dim] = x.dims();
        let half = self.dim / 2;
        let cos = self.cos.clone().narrow(0, start, tokens).unsqueeze::<3>();
        let sin = self.sin.clone().narrow(0, start, tokens).unsqueeze::<3>();
        let rot = x.clone().narrow(2, 0, self.dim);
        let x1 = rot.clone().narrow(2, 0, half);
        let x2 = rot.clone().narrow(2, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 2);
        let out = rot * cos + rotated * sin;
        if self.dim == head_dim {
            out
        } else {
            Tensor::cat(vec![out, x.narrow(2, self.dim, head_dim - self.dim)], 2)
        }
    }
}

/// Keys and values of every layer, `[heads, allocated, head_dim]` each, written in place. A new
/// cache has room for [`FIRST_ALLOCATION`] tokens and grows to the whole context once it needs
/// more, so a short chat does not hold what Phi-2's 2048 tokens take (1.34 GB in f32; 0.17 GB
/// for 256). One growth only: the device's allocator keeps freed memory for reuse rather than
/// handing it back (cubecl's explicit cleanup blocks on the device, which wasm cannot do), so
/// doubling step by step would leave every earlier size held.
pub struct KvCache {
    keys: Vec<Option<Tensor<3>>>,
    values: Vec<Option<Tensor<3>>>,
    len: usize,
    capacity: usize,
}

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
        self.first_keys().map_or(0, |keys| keys.dims()[1])
    }

    /// The first layer's keys, which stand for every layer's allocation.
    fn first_keys(&self) -> Option<&Tensor<3>> {
        self.keys.first().and_then(|slot| slot.as_ref())
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
        for slot in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let old = slot
                .take()
                .expect("cache slot is always filled between calls");
            let [heads, _, head_dim] = old.dims();
            let options = (&old.device(), old.dtype());
            let bigger = Tensor::<3>::zeros([heads, size, head_dim], options);
            let bigger = match kept {
                0 => bigger,
                _ => bigger.slice_assign([0..heads, 0..kept, 0..head_dim], old.narrow(1, 0, kept)),
            };
            *slot = Some(bigger);
        }
    }

    /// The element type it holds (see [`crate::kernels::kv_cache_dtype`]).
    pub fn dtype(&self) -> burn::tensor::DType {
        self.first_keys()
            .map_or(burn::tensor::DType::F32, |keys| keys.dtype())
    }

    /// Forgets everything after the first `len` tokens (the memory is reused).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Writes this step's `[heads, tokens, head_dim]` keys/values at `start` and returns the
    /// cache contents so far. The tensors are moved out and back so the write can be in place.
    fn append(
        &mut self,
        layer: usize,
        start: usize,
        k: Tensor<3>,
        v: Tensor<3>,
    ) -> (Tensor<3>, Tensor<3>) {
        let [heads, tokens, head_dim] = k.dims();
        let end = start + tokens;
        let write = |slot: &mut Option<Tensor<3>>, new: Tensor<3>| {
            let cache = slot
                .take()
                .expect("cache slot is always filled between calls");
            let cache = cache.slice_assign([0..heads, start..end, 0..head_dim], new);
            let seen = cache.clone().narrow(1, 0, end);
            *slot = Some(cache);
            seen
        };
        let keys = write(&mut self.keys[layer], k);
        let values = write(&mut self.values[layer], v);
        (keys, values)
    }
}

pub struct Phi {
    config: PhiConfig,
    /// Columns of the MLP's part of a layer's activations ([`mlp_width`]).
    mlp_width: usize,
    device: Device,
    embedding: Embedding,
    layers: Vec<DecoderLayer>,
    final_norm: LayerNorm,
    lm_head: Linear,
    rotary: Rotary,
}

impl Phi {
    pub fn from_weights(mut weights: Weights, device: &Device) -> Self {
        let config = weights.config.clone();
        let eps = config.layer_norm_eps;
        let plan = KernelPlan::best(device);
        let layers = (0..config.num_hidden_layers)
            .map(|n| {
                let [fan_out, fan_in] = FusedLinear::of_layer(&config)
                    .map(|fused| weights.take_fused(n, &fused, device));
                DecoderLayer {
                    norm: LayerNorm {
                        weight: weights.take(Slot::Layer(n, LayerParam::NormWeight)),
                        bias: weights.take(Slot::Layer(n, LayerParam::NormBias)),
                        eps,
                        plan,
                    },
                    fan_out,
                    fan_in,
                }
            })
            .collect();
        Phi {
            mlp_width: mlp_width(&config),
            embedding: weights.take_embedding(),
            layers,
            final_norm: LayerNorm {
                weight: weights.take(Slot::FinalNormWeight),
                bias: weights.take(Slot::FinalNormBias),
                eps,
                plan,
            },
            lm_head: weights.take_linear(Slot::LmHeadWeight, Slot::LmHeadBias),
            rotary: Rotary::new(&config, device),
            config,
            device: device.clone(),
        }
    }

    pub fn config(&self) -> &PhiConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A cache for up to the whole context (`max_position_embeddings` tokens), with memory for
    /// [`FIRST_ALLOCATION`] of them to start with, in f32 or, where allowed, f16
    /// ([`crate::kernels::allow_f16`]).
    pub fn new_cache(&self) -> KvCache {
        self.cache_for(self.config.num_hidden_layers)
    }

    /// [`Phi::new_cache`] for the first `layers` layers.
    fn cache_for(&self, layers: usize) -> KvCache {
        let heads = self.config.num_attention_heads;
        let head_dim = self.config.head_dim();
        let capacity = self.config.max_position_embeddings;
        let allocated = FIRST_ALLOCATION.min(capacity);
        let dtype = crate::kernels::kv_cache_dtype(&self.device);
        let empty = || {
            Some(Tensor::<3>::zeros(
                [heads, allocated, head_dim],
                (&self.device, dtype),
            ))
        };
        KvCache {
            keys: (0..layers).map(|_| empty()).collect(),
            values: (0..layers).map(|_| empty()).collect(),
            len: 0,
            capacity,
        }
    }

    /// Runs `tokens` after what the cache holds and returns the logits of the last one,
    /// `[1, vocab_size]`. Callers check that the tokens fit in the cache.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Tensor<2> {
        self.forward_through(self.layers.len(), tokens, cache)
    }

    /// Compiles the model's kernels for a prompt and a decoded token (the package's warm-up
    /// also picks a greedy token from the logits, compiling that step's few) for a small part
    /// of their work: a two-token prompt then one token through the first layer only (every
    /// layer runs the same kernels), the final LayerNorm and lm_head. On a software adapter one
    /// token through the whole model takes seconds. The logits, `[1, vocab_size]`, are those of
    /// that truncated model; nothing is kept.
    pub fn warm_up(&self) -> Tensor<2> {
        let mut cache = self.cache_for(1);
        // Token 0: every vocabulary has it.
        self.forward_through(1, &[0, 0], &mut cache);
        self.forward_through(1, &[0], &mut cache)
    }

    /// [`Phi::forward`] through the first `layers` layers (the cache has at least as many).
    fn forward_through(&self, layers: usize, tokens: &[u32], cache: &mut KvCache) -> Tensor<2> {
        assert!(
            layers <= self.layers.len() && layers <= cache.keys.len(),
            "forward: {layers} layers with a model of {} and a cache of {}",
            self.layers.len(),
            cache.keys.len()
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
        let mut hidden = self.embedding.forward(tokens, &self.device);
        // The GPU attention kernels skip masked positions; only the CPU path adds a mask.
        let mask = (count > 1 && crate::kernels::is_cpu(&self.device))
            .then(|| self.causal_mask(start, count));
        let attention_width = self.mlp_width + self.config.hidden_size;
        for (index, layer) in self.layers.iter().take(layers).enumerate() {
            let x = layer.norm.forward(hidden.clone());
            let mlp = Epilogue {
                gelu_outputs: self.mlp_width,
                residual: None,
            };
            let inner = layer.fan_out.forward(x, mlp);
            let inner = self.attention(inner, start, index, cache, mask.clone());
            let residual = Epilogue {
                gelu_outputs: 0,
                residual: Some(hidden),
            };
            hidden = layer
                .fan_in
                .forward(inner.narrow(1, 0, attention_width), residual);
        }
        cache.len = start + count;
        let last = hidden.narrow(0, count - 1, 1);
        self.lm_head
            .forward(self.final_norm.forward(last), Epilogue::default())
    }

    /// `[1, tokens, start + tokens]`: 0 where a token may attend, `MASKED` after it.
    fn causal_mask(&self, start: usize, count: usize) -> Tensor<3> {
        let total = start + count;
        let values: Vec<f32> = (0..count)
            .flat_map(|i| (0..total).map(move |j| if j > start + i { MASKED } else { 0.0 }))
            .collect();
        Tensor::from_data(TensorData::new(values, [1, count, total]), &self.device)
    }

    /// Attention of the new tokens: their `[q | k | v]` are the columns from `mlp_width` of
    /// `inner` (`fan_out`'s output); the result, heads merged, replaces `q` there.
    fn attention(
        &self,
        inner: Tensor<2>,
        start: usize,
        index: usize,
        cache: &mut KvCache,
        mask: Option<Tensor<3>>,
    ) -> Tensor<2> {
        let [count, _] = inner.dims();
        let hidden = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let head_dim = self.config.head_dim();
        let scale = 1.0 / (head_dim as f64).sqrt();
        let q_at = self.mlp_width;
        if !crate::kernels::is_cpu(&self.device) {
            let slot = |slot: &Option<Tensor<3>>| {
                slot.clone()
                    .expect("cache slot is always filled between calls")
            };
            let (keys, values) = (slot(&cache.keys[index]), slot(&cache.values[index]));
            let rotary = [&self.rotary.cos, &self.rotary.sin];
            return crate::kernels::attention(
                inner,
                q_at,
                &keys,
                &values,
                rotary,
                start,
                scale as f32,
            );
        }
        let part = |n: usize| inner.clone().narrow(1, q_at + n * hidden, hidden);
        // Each [heads, count, head_dim].
        let split = |t: Tensor<2>, rotate| self.rotary.split_heads(t, heads, start, rotate);
        let q = split(part(0), true);
        let k = split(part(1), true);
        let v = split(part(2), false);
        let (keys, values) = cache.append(index, start, k, v);
        let mut scores = q.matmul(keys.swap_dims(1, 2)) * scale; // [heads, count, total]
        if let Some(mask) = mask {
            scores = scores + mask;
        }
        let probs = softmax(scores, 2);
        let merged = probs
            .matmul(values) // [heads, count, head_dim]
            .swap_dims(0, 1)
            .reshape([count, hidden]);
        inner.slice_assign([0..count, q_at..q_at + hidden], merged)
    }
}
