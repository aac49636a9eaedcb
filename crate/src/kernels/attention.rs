//! Causal attention of new tokens over a layer's KV cache, with the rotary embedding applied on
//! the way and the new keys and values written into the cache: one kernel launch on GPU
//! backends (for what burn's ops do in about forty), tensor ops on burn's CPU backend.

#[cfg(feature = "gpu")]
use burn::backend::Cube;
use burn::tensor::activation::softmax;
#[cfg(feature = "gpu")]
use burn::tensor::DType;
use burn::tensor::{Device, Tensor, TensorData};
#[cfg(feature = "gpu")]
use cubecl::prelude::CubeDim;

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

/// Positions whose softmax weights a workgroup holds at once in [`gpu_attention`]'s kernel:
/// longer contexts go through in chunks, the softmax carried across them (a running maximum
/// and sum, rescaled as the maximum grows).
#[cfg(feature = "gpu")]
const CHUNK: usize = 256;

/// [`attention`]'s kernel: one workgroup per head and new token.
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
    // A thread per dimension of a head, in a power of two of at least WORKGROUP.
    let threads = (WORKGROUP as usize).max(head_dim.next_power_of_two());
    assert!(
        threads <= 256,
        "attention: heads of {head_dim} dims are too wide"
    );
    let [cos, sin] = rotary.map(|t| cube(t.clone()));
    let (keys, values) = (cube(cache.keys.clone()), cube(cache.values.clone()));
    let client = inner.client.clone();
    macro_rules! launch {
        ($cache:ty) => {
            unsafe {
                shader::attention_kernel::launch_unchecked::<$cache>(
                    &client,
                    grid(heads * count),
                    CubeDim::new_1d(threads as u32),
                    buffer(&inner),
                    buffer(&cos),
                    buffer(&sin),
                    buffer(&keys),
                    buffer(&values),
                    stride,
                    q_at,
                    heads,
                    rot,
                    count,
                    start,
                    capacity,
                    scale,
                    head_dim,
                    threads,
                    CHUNK,
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

    use crate::kernels::reduce::{combine_across_workgroup, scratch_len};

    /// Element `d` of head `h` of the projection starting at column `at` of the activation
    /// row starting at `row`, rotated the rotate-half way on the first `rot` dims for position
    /// `pos` (`rot` = 0: as it is). `inner` is taken as the kernel holds it (cubecl does not
    /// reborrow a mutable buffer as a shared one).
    #[cube]
    #[allow(clippy::too_many_arguments)] // one element of a rotated head: where, and the tables
    fn rotated(
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

    /// Causal attention of new token `t` for head `h` (workgroup `t·heads + h`), the rotary
    /// embedding applied on the way. Row `t` of `inner` (`stride` wide) holds token `t`'s
    /// queries, keys and values side by side from column `q_at`; the output, heads merged,
    /// replaces its queries (which only this workgroup reads). Keys and values of earlier
    /// tokens come from the cache `[heads, capacity, head_dim]` (`C`: f32, or f16 where
    /// allowed; the arithmetic is f32); those of new tokens from `inner`, rotated by each
    /// workgroup that needs them, and token `t`'s are written into the cache here: no
    /// workgroup reads what another writes.
    ///
    /// The query goes to workgroup memory; then, `chunk` positions at a time, each thread
    /// scores some positions, the workgroup takes their maximum and the exponentials' sum,
    /// and thread `d` adds the weighted values of dimension `d`, rescaling what it had when
    /// the maximum grows.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)] // the layout of the activations and of the cache
    pub fn attention_kernel<C: Float>(
        inner: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        keys: &mut [C],
        values: &mut [C],
        stride: usize,
        q_at: usize,
        heads: usize,
        rot: usize,
        count: usize,
        start: usize,
        capacity: usize,
        scale: f32,
        #[comptime] head_dim: usize,
        #[comptime] threads: usize,
        #[comptime] chunk: usize,
    ) {
        let unit = UNIT_POS as usize;
        let h = CUBE_POS % heads;
        let t = CUBE_POS / heads;
        // Uniform across the workgroup, as its barriers require: a wrapped grid's extra
        // workgroups attend nothing and write nothing.
        let valid = t < count;
        let t = select(valid, t, 0usize);
        let position = start + t;
        let hidden = heads * head_dim;
        let row = t * stride;
        let k_at = q_at + hidden;
        let v_at = k_at + hidden;
        let mut query = Shared::<[f32]>::new_slice(head_dim);
        let mut weights = Shared::<[f32]>::new_slice(chunk);
        let mut scratch = Shared::<[f32]>::new_slice(comptime!(scratch_len(1, threads)));
        let mut d = unit;
        while d < head_dim {
            query[d] = rotated(inner, cos, sin, row, q_at, h, d, head_dim, rot, position);
            if valid {
                let cached = (h * capacity + position) * head_dim + d;
                keys[cached] = C::cast_from(rotated(
                    inner, cos, sin, row, k_at, h, d, head_dim, rot, position,
                ));
                values[cached] = C::cast_from(inner[row + v_at + h * head_dim + d]);
            }
            d += threads;
        }
        sync_cube();
        let end = select(valid, position + 1, 0usize);
        // Large and finite: WGSL does not promise IEEE infinities.
        let mut max = f32::new(-1.0e30);
        let mut sum = f32::new(0.0);
        let mut acc = f32::new(0.0);
        let mut shared = Array::<f32>::new(1usize);
        let mut first = 0usize;
        while first < end {
            let len = select(end - first < chunk, end - first, chunk);
            let mut local_max = f32::new(-1.0e30);
            let mut j = unit;
            while j < len {
                let p = first + j;
                let mut dot = f32::new(0.0);
                if p < start {
                    let cached = (h * capacity + p) * head_dim;
                    for e in 0..head_dim {
                        dot += query[e] * f32::cast_from(keys[cached + e]);
                    }
                } else {
                    let key_row = (p - start) * stride;
                    for e in 0..head_dim {
                        let key = rotated(inner, cos, sin, key_row, k_at, h, e, head_dim, rot, p);
                        dot += query[e] * key;
                    }
                }
                let score = dot * scale;
                weights[j] = score;
                local_max = local_max.max(score);
                j += threads;
            }
            shared[0] = local_max;
            combine_across_workgroup(&mut shared, &mut scratch, 1usize, threads, false, true);
            let new_max = max.max(shared[0]);
            let rescale = (max - new_max).exp();
            let mut local_sum = f32::new(0.0);
            j = unit;
            while j < len {
                let e = (weights[j] - new_max).exp();
                weights[j] = e;
                local_sum += e;
                j += threads;
            }
            shared[0] = local_sum;
            // Its barriers also make every thread's weights visible to all.
            combine_across_workgroup(&mut shared, &mut scratch, 1usize, threads, false, false);
            sum = sum * rescale + shared[0];
            max = new_max;
            if unit < head_dim {
                acc *= rescale;
                for jj in 0..len {
                    let p = first + jj;
                    let value = if p < start {
                        f32::cast_from(values[(h * capacity + p) * head_dim + unit])
                    } else {
                        inner[(p - start) * stride + v_at + h * head_dim + unit]
                    };
                    acc += weights[jj] * value;
                }
            }
            // Everyone has read the weights before the next chunk's are written.
            sync_cube();
            first += chunk;
        }
        if valid && unit < head_dim {
            inner[row + q_at + h * head_dim + unit] = acc / sum;
        }
    }
}
