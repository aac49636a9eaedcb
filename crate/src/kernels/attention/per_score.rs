//! Attention as two kernels, shaped for software adapters (a CPU emulating a GPU), where a
//! workgroup's barriers cost more than a launch: a thread per score (the rotary embedding and
//! the cache write inside), then a thread per output value (softmax and the weighted values).

use burn::tensor::DType;
use cubecl::prelude::{BufferArg, CubeDim};

use super::Operands;
use crate::kernels::{buffer, grid, WORKGROUP};

/// The two launches for `ops`.
pub(super) fn launch(ops: &Operands) {
    let ([heads, capacity, head_dim], rot) = ops.layout();
    let (count, start, stride, q_at, scale) =
        (ops.count, ops.start, ops.stride, ops.q_at, ops.scale);
    let [cos, sin] = &ops.rotary;
    let (inner, keys, values) = (&ops.inner, &ops.keys, &ops.values);
    let client = &inner.client;
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
                    client,
                    cubes(scores_len),
                    dim,
                    buffer(inner),
                    buffer(cos),
                    buffer(sin),
                    buffer(keys),
                    buffer(values),
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
                    client,
                    cubes(out_len),
                    dim,
                    BufferArg::from_raw_parts(scores, scores_len),
                    buffer(values),
                    buffer(inner),
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
}

mod shader {
    use cubecl::prelude::*;

    use super::super::shader::rotated;

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
        inner: &mut [f32],
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
