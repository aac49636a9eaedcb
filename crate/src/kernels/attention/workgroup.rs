//! Attention as one kernel: a workgroup per head and new token, the softmax carried across
//! chunks of positions (see [`shader::attention_kernel`]).

use burn::tensor::DType;
use cubecl::prelude::CubeDim;

use super::Operands;
use crate::kernels::{buffer, grid, WORKGROUP};

/// Positions whose softmax weights a workgroup holds at once:
/// longer contexts go through in chunks, the softmax carried across them (a running maximum
/// and sum, rescaled as the maximum grows).
const CHUNK: usize = 256;

/// Threads of a workgroup: one per dimension of a head, a power of two of at least
/// `WORKGROUP`.
fn threads(head_dim: usize) -> usize {
    (WORKGROUP as usize).max(head_dim.next_power_of_two())
}

/// Whether heads of `head_dim` dims fit a workgroup of the 256 threads every WebGPU device
/// offers.
pub(super) fn fits(head_dim: usize) -> bool {
    threads(head_dim) <= 256
}

/// One launch for `ops` (whose heads [`fit`](fits)).
pub(super) fn launch(ops: &Operands) {
    let ([heads, capacity, head_dim], rot) = ops.layout();
    let threads = threads(head_dim);
    let [cos, sin] = &ops.rotary;
    let client = &ops.inner.client;
    macro_rules! launch {
        ($cache:ty) => {
            unsafe {
                shader::attention_kernel::launch_unchecked::<$cache>(
                    client,
                    grid(heads * ops.count),
                    CubeDim::new_1d(threads as u32),
                    buffer(&ops.inner),
                    buffer(cos),
                    buffer(sin),
                    buffer(&ops.keys),
                    buffer(&ops.values),
                    ops.stride,
                    ops.q_at,
                    heads,
                    rot,
                    ops.count,
                    ops.start,
                    capacity,
                    ops.scale,
                    head_dim,
                    threads,
                    CHUNK,
                );
            }
        };
    }
    match ops.keys.dtype {
        DType::F16 => launch!(half::f16),
        _ => launch!(f32),
    }
}

mod shader {
    use cubecl::prelude::*;

    use super::super::shader::rotated;
    use crate::kernels::reduce::{combine_across_workgroup, scratch_len};

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
