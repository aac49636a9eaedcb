//! Causal attention of new tokens over a layer's KV cache, with the rotary embedding applied on
//! the way and the new keys and values written into the cache: two kernel launches on GPU
//! backends (for what burn's ops do in about forty), tensor ops on burn's CPU backend.

#[cfg(feature = "gpu")]
use burn::backend::Cube;
use burn::tensor::activation::softmax;
#[cfg(feature = "gpu")]
use burn::tensor::DType;
use burn::tensor::{Device, Tensor, TensorData};
#[cfg(feature = "gpu")]
use cubecl::prelude::{BufferArg, CubeDim};

#[cfg(feature = "gpu")]
use super::{buffer, cube, grid, is_cpu, WORKGROUP};

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
/// is returned with the cache. The cache has room for `start + count` tokens.
pub fn attention(
    inner: Tensor<2>,
    q_at: usize,
    cache: LayerCache,
    rotary: [&Tensor<2>; 2],
    start: usize,
    scale: f32,
) -> (Tensor<2>, LayerCache) {
    #[cfg(feature = "gpu")]
    if !is_cpu(&inner.device()) {
        let inner = gpu_attention(inner, q_at, &cache, rotary, start, scale);
        return (inner, cache);
    }
    cpu_attention(inner, q_at, cache, rotary, start, scale)
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

/// [`attention`]'s two kernels: scores with the rotary embedding (and the cache write), then
/// softmax and values.
#[cfg(feature = "gpu")]
fn gpu_attention(
    inner: Tensor<2>,
    q_at: usize,
    cache: &LayerCache,
    rotary: [&Tensor<2>; 2],
    start: usize,
    scale: f32,
) -> Tensor<2> {
    let [count, stride] = inner.dims();
    let [heads, capacity, head_dim] = cache.keys.dims();
    let rot = rotary[0].dims()[1];
    let inner = cube(inner);
    assert!(
        inner.meta.strides()[..] == [stride, 1],
        "attention: the activations must be contiguous"
    );
    let [cos, sin] = rotary.map(|t| cube(t.clone()));
    let (keys, values) = (cube(cache.keys.clone()), cube(cache.values.clone()));
    let client = inner.client.clone();
    let total = start + count;
    let scores_len = heads * count * total;
    let scores = client.empty(scores_len * 4);
    let out_len = count * heads * head_dim;
    let dim = CubeDim::new_1d(WORKGROUP);
    let cubes = |n: usize| grid(n.div_ceil(WORKGROUP as usize));
    macro_rules! launch {
        ($cache:ty) => {
            unsafe {
                shader::attention_scores_kernel::launch_unchecked::<$cache>(
                    &client,
                    cubes(scores_len),
                    dim,
                    buffer(&inner),
                    buffer(&cos),
                    buffer(&sin),
                    buffer(&keys),
                    buffer(&values),
                    BufferArg::from_raw_parts(scores.clone(), scores_len),
                    stride,
                    q_at,
                    heads,
                    head_dim,
                    rot,
                    count,
                    start,
                    capacity,
                    scale,
                );
                shader::attention_values_kernel::launch_unchecked::<$cache>(
                    &client,
                    cubes(out_len),
                    dim,
                    BufferArg::from_raw_parts(scores, scores_len),
                    buffer(&values),
                    buffer(&inner),
                    stride,
                    q_at,
                    heads,
                    head_dim,
                    count,
                    start,
                    capacity,
                );
            }
        };
    }
    match keys.dtype {
        DType::F16 => launch!(half::f16),
        _ => launch!(f32),
    }
    Tensor::from_primitive::<Cube>(inner)
}

#[cfg(feature = "gpu")]
mod shader {
    use cubecl::prelude::*;

    /// Element `d` of head `h` of the projection starting at column `at` of the activation
    /// row starting at `row`, rotated the rotate-half way on the first `rot` dims for position
    /// `pos` (`rot` = 0: as it is).
    #[cube]
    #[allow(clippy::too_many_arguments)] // one element of a rotated head: where, and the tables
    fn rotated(
        inner: &[f32],
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

    /// `scores[h, t, j] = scale · q[h, t] · key[h, j]` for the positions token `t` may attend
    /// (`j ≤ start + t`; the others are never read), the rotary embedding applied on the way.
    /// Row `t` of `inner` (`stride` wide) holds token `t`'s queries, keys and values side by
    /// side from column `q_at`. Keys of earlier tokens come from the cache `[heads, capacity,
    /// head_dim]`. New keys are rotated from `inner` by each thread that needs them, and the
    /// thread on the diagonal (`j = start + t`) writes them, and their values, into the cache:
    /// no thread reads what another writes. The cache holds `C` (f32, or f16 where allowed);
    /// the arithmetic is f32. One thread per score.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)] // the layout of the activations and of the cache
    pub fn attention_scores_kernel<C: Float>(
        inner: &[f32],
        cos: &[f32],
        sin: &[f32],
        keys: &mut [C],
        values: &mut [C],
        scores: &mut [f32],
        stride: usize,
        q_at: usize,
        heads: usize,
        head_dim: usize,
        rot: usize,
        count: usize,
        start: usize,
        capacity: usize,
        scale: f32,
    ) {
        let total = start + count;
        let index = ABSOLUTE_POS;
        if index < heads * count * total {
            let j = index % total;
            let t = (index / total) % count;
            let h = index / (total * count);
            if j <= start + t {
                let hidden = heads * head_dim;
                let cached = (h * capacity + j) * head_dim;
                let q_row = t * stride;
                let mut dot = f32::new(0.0);
                if j < start {
                    for d in 0..head_dim {
                        let q =
                            rotated(inner, cos, sin, q_row, q_at, h, d, head_dim, rot, start + t);
                        dot += q * f32::cast_from(keys[cached + d]);
                    }
                } else {
                    let k_row = (j - start) * stride;
                    let k_at = q_at + hidden;
                    for d in 0..head_dim {
                        let q =
                            rotated(inner, cos, sin, q_row, q_at, h, d, head_dim, rot, start + t);
                        let key = rotated(inner, cos, sin, k_row, k_at, h, d, head_dim, rot, j);
                        dot += q * key;
                        if j == start + t {
                            keys[cached + d] = C::cast_from(key);
                            values[cached + d] =
                                C::cast_from(inner[k_row + k_at + hidden + h * head_dim + d]);
                        }
                    }
                }
                scores[index] = dot * scale;
            }
        }
    }

    /// Token `t`'s attention output for head `h`, dim `d`: the softmax of its scores over the
    /// positions it attends, weighting the cached values. Written to row `t` of `inner` at
    /// column `out_at + h·head_dim + d` (the queries' place: the scores kernel, launched
    /// before, was their last reader), the heads merged, ready for the output projection.
    /// One thread per value; each computes its row's maximum and sum itself.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)] // the layout of the activations and of the cache
    pub fn attention_values_kernel<C: Float>(
        scores: &[f32],
        values: &[C],
        inner: &mut [f32],
        stride: usize,
        out_at: usize,
        heads: usize,
        head_dim: usize,
        count: usize,
        start: usize,
        capacity: usize,
    ) {
        let index = ABSOLUTE_POS;
        if index < count * heads * head_dim {
            let d = index % head_dim;
            let h = (index / head_dim) % heads;
            let t = index / (head_dim * heads);
            let at = (h * count + t) * (start + count);
            let end = start + t + 1;
            let mut max = scores[at];
            for j in 1..end {
                max = max.max(scores[at + j]);
            }
            let mut sum = f32::new(0.0);
            let mut acc = f32::new(0.0);
            for j in 0..end {
                let e = (scores[at + j] - max).exp();
                sum += e;
                acc += e * f32::cast_from(values[(h * capacity + j) * head_dim + d]);
            }
            inner[t * stride + out_at + h * head_dim + d] = acc / sum;
        }
    }
}
