//! Causal attention of new tokens over a layer's KV cache, with the rotary embedding applied on
//! the way and the new keys and values written into the cache: on GPU backends one kernel
//! launch ([`workgroup`]), or two on a software adapter ([`per_score`]: barriers cost there what
//! a launch saves) and for heads wider than a workgroup, for what burn's ops do in about forty;
//! tensor ops on burn's CPU backend.

#[cfg(feature = "gpu")]
use burn::backend::wgpu::CubeTensor;
#[cfg(feature = "gpu")]
use burn::backend::Cube;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

use super::KernelPlan;
#[cfg(feature = "gpu")]
use super::{cube, is_cpu};

#[cfg(feature = "gpu")]
mod per_score;
#[cfg(feature = "gpu")]
mod workgroup;

/// Added to masked attention scores on the CPU path. Large and finite, as in the kernels'
/// arithmetic: WGSL does not promise IEEE infinities.
const MASKED: f32 = -1.0e9;

/// One layer's cached keys and values, `[heads, allocated, head_dim]` each, f32 or f16 (see
/// [`super::KernelPlan::kv_cache_dtype`]).
pub struct LayerCache {
    pub keys: Tensor<3>,
    pub values: Tensor<3>,
}

/// One layer's causal attention for `count` new tokens at positions `start..`. Row `t` of
/// `inner: [count, stride]` holds token `t`'s queries, keys and values side by side from
/// column `q_at` (`[q | k | v]`, each `heads·head_dim` wide). The keys (rotated with the
/// `[positions, rotary_dim]` cos and sin tables) and the values are written into `cache` at
/// `start..`, and the attention output, heads merged, replaces the queries in `inner`, which
/// is returned with the cache. The cache has room for `start + count` tokens. On a GPU, the
/// kernels of `plan`.
#[cfg_attr(not(feature = "gpu"), allow(unused_variables))] // plan: the kernels'
pub fn attention(
    inner: Tensor<2>,
    q_at: usize,
    cache: LayerCache,
    rotary: [&Tensor<2>; 2],
    start: usize,
    scale: f32,
    plan: KernelPlan,
) -> (Tensor<2>, LayerCache) {
    #[cfg(feature = "gpu")]
    if !is_cpu(&inner.device()) {
        let [count, stride] = inner.dims();
        let inner = cube(inner);
        assert!(
            inner.meta.strides()[..] == [stride, 1],
            "attention: the activations must be contiguous"
        );
        let operands = Operands {
            rotary: rotary.map(|t| cube(t.clone())),
            keys: cube(cache.keys.clone()),
            values: cube(cache.values.clone()),
            inner,
            q_at,
            count,
            stride,
            start,
            scale,
        };
        let ([_, _, head_dim], _) = operands.layout();
        match plan.software || !workgroup::fits(head_dim) {
            true => per_score::launch(&operands),
            false => workgroup::launch(&operands),
        }
        return (Tensor::from_primitive::<Cube>(operands.inner), cache);
    }
    cpu_attention(inner, q_at, cache, rotary, start, scale)
}

/// What both GPU paths take: the activations `inner: [count, stride]` (queries from column
/// `q_at`, then keys and values), the rotary tables `[cos, sin]`, the layer's cache, and the
/// new tokens' first position and the scores' scale.
#[cfg(feature = "gpu")]
struct Operands {
    inner: CubeTensor,
    rotary: [CubeTensor; 2],
    keys: CubeTensor,
    values: CubeTensor,
    q_at: usize,
    count: usize,
    stride: usize,
    start: usize,
    scale: f32,
}

#[cfg(feature = "gpu")]
impl Operands {
    /// `[heads, capacity, head_dim]` of the cache, and the rotated dims of a head.
    fn layout(&self) -> ([usize; 3], usize) {
        let shape = self.keys.meta.shape();
        (
            [shape[0], shape[1], shape[2]],
            self.rotary[0].meta.shape()[1],
        )
    }
}

/// [`attention`] with burn's tensor ops.
fn cpu_attention(
    inner: Tensor<2>,
    q_at: usize,
    cache: LayerCache,
    rotary: [&Tensor<2>; 2],
    start: usize,
    scale: f32,
) -> (Tensor<2>, LayerCache) {
    let [count, _] = inner.dims();
    let [heads, _, head_dim] = cache.keys.dims();
    let hidden = heads * head_dim;
    let end = start + count;
    // Each [heads, count, head_dim].
    let split = |n: usize| {
        inner
            .clone()
            .narrow(1, q_at + n * hidden, hidden)
            .reshape([count, heads, head_dim])
            .swap_dims(0, 1)
    };
    let q = apply_rotary_pos_emb(split(0), rotary, start);
    let k = apply_rotary_pos_emb(split(1), rotary, start);
    let keys = cache
        .keys
        .slice_assign([0..heads, start..end, 0..head_dim], k);
    let values = cache
        .values
        .slice_assign([0..heads, start..end, 0..head_dim], split(2));
    let seen = |t: &Tensor<3>| t.clone().narrow(1, 0, end);
    let mut scores = q.matmul(seen(&keys).swap_dims(1, 2)) * scale; // [heads, count, end]
    if count > 1 {
        scores = scores + causal_mask(start, count, &inner.device());
    }
    let merged = softmax(scores, 2)
        .matmul(seen(&values)) // [heads, count, head_dim]
        .swap_dims(0, 1)
        .reshape([count, hidden]);
    let inner = inner.slice_assign([0..count, q_at..q_at + hidden], merged);
    (inner, LayerCache { keys, values })
}

/// `x: [heads, tokens, head_dim]` for positions `start..start + tokens`, rotated the
/// rotate-half way on its first `rotary_dim` dims (the tables' width), as transformers'
/// `apply_rotary_pos_emb` does.
fn apply_rotary_pos_emb(x: Tensor<3>, [cos, sin]: [&Tensor<2>; 2], start: usize) -> Tensor<3> {
    let [_, tokens, head_dim] = x.dims();
    let dim = cos.dims()[1];
    let half = dim / 2;
    let cos = cos.clone().narrow(0, start, tokens).unsqueeze::<3>();
    let sin = sin.clone().narrow(0, start, tokens).unsqueeze::<3>();
    let rot = x.clone().narrow(2, 0, dim);
    let x1 = rot.clone().narrow(2, 0, half);
    let x2 = rot.clone().narrow(2, half, half);
    let rotate_half = Tensor::cat(vec![x2.neg(), x1], 2);
    let out = rot * cos + rotate_half * sin;
    if dim == head_dim {
        out
    } else {
        Tensor::cat(vec![out, x.narrow(2, dim, head_dim - dim)], 2)
    }
}

/// `[1, count, start + count]`: 0 where a new token may attend, [`MASKED`] after it.
fn causal_mask(start: usize, count: usize, device: &Device) -> Tensor<3> {
    let total = start + count;
    let values: Vec<f32> = (0..count)
        .flat_map(|i| (0..total).map(move |j| if j > start + i { MASKED } else { 0.0 }))
        .collect();
    Tensor::from_data(TensorData::new(values, [1, count, total]), device)
}

#[cfg(feature = "gpu")]
mod shader {
    use cubecl::prelude::*;

    /// Element `d` of head `h` of the projection starting at column `at` of the activation
    /// row starting at `row`, rotated the rotate-half way on the first `rot` dims for position
    /// `pos` (`rot` = 0: as it is). `inner` is taken as the kernel holds it (cubecl does not
    /// reborrow a mutable buffer as a shared one).
    #[cube]
    #[allow(clippy::too_many_arguments)] // one element of a rotated head: where, and the tables
    pub(super) fn rotated(
        inner: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        row: usize,
        at: usize,
        h: usize,
        d: usize,
        head_dim: usize,
        rot: usize,
        pos: usize,
    ) -> f32 {
        let base = row + at + h * head_dim;
        let mut value = inner[base + d];
        if d < rot {
            let half = rot / 2;
            // rotate_half: the partner of d is d + half (negated) or d - half.
            let partner = inner[base + (d + half) % rot];
            let sign = select(d < half, f32::new(-1.0), f32::new(1.0));
            let table = pos * rot + d;
            value = value * cos[table] + sign * partner * sin[table];
        }
        value
    }
}
