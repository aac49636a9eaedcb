//! Reductions across a workgroup, for the kernels whose threads share one result (the decode
//! matmul's rows, LayerNorm's statistics, attention's softmax, the greedy pick): through
//! subgroups where the plan has them, else a tree in workgroup memory (core WebGPU).

use cubecl::prelude::*;

/// Workgroup memory [`combine_across_workgroup`] needs for `count` values per thread in a
/// workgroup of `threads`.
pub(crate) fn scratch_len(count: usize, threads: usize) -> usize {
    count * threads
}

/// Replaces each of a thread's `count` `values` by its sum (or, with `maximum`, its largest)
/// over the workgroup's `threads` threads (a power of two), in every thread. Every thread of
/// the workgroup must get here together (it holds barriers). `scratch` holds at least
/// [`scratch_len`] values and may be reused once this returns.
/// - `plane`: each subgroup combines its lanes' values (any subgroup size), then each
///   subgroup's first lane hands its result on through `scratch`. This takes a subgroup to be
///   `PLANE_DIM` consecutive invocations of the workgroup, as the per-row kernels already do:
///   how every driver we know forms them in a one-dimensional workgroup, though neither
///   WebGPU nor Vulkan promises it.
/// - otherwise: a tree over `scratch` halving the active threads at each level.
#[cube]
pub(crate) fn combine_across_workgroup(
    values: &mut Array<f32>,
    scratch: &mut [f32],
    #[comptime] count: usize,
    #[comptime] threads: usize,
    #[comptime] plane: bool,
    #[comptime] maximum: bool,
) {
    let unit = UNIT_POS as usize;
    if plane {
        #[unroll]
        for k in 0..count {
            values[k] = if maximum {
                plane_max(values[k])
            } else {
                plane_sum(values[k])
            };
        }
        let planes = (CUBE_DIM / PLANE_DIM) as usize;
        if UNIT_POS_PLANE == 0 {
            let plane_index = unit / (PLANE_DIM as usize);
            #[unroll]
            for k in 0..count {
                scratch[k * threads + plane_index] = values[k];
            }
        }
        sync_cube();
        #[unroll]
        for k in 0..count {
            let mut total = scratch[k * threads];
            for p in 1..planes {
                total = combine(total, scratch[k * threads + p], maximum);
            }
            values[k] = total;
        }
    } else {
        #[unroll]
        for k in 0..count {
            scratch[k * threads + unit] = values[k];
        }
        sync_cube();
        #[unroll]
        for level in 0..comptime!(threads.trailing_zeros() as usize) {
            let half = comptime!(threads >> (level + 1));
            if unit < half {
                #[unroll]
                for k in 0..count {
                    let at = k * threads + unit;
                    scratch[at] = combine(scratch[at], scratch[at + half], maximum);
                }
            }
            sync_cube();
        }
        #[unroll]
        for k in 0..count {
            values[k] = scratch[k * threads];
        }
    }
    // Everyone has read `scratch` before anyone writes it again.
    sync_cube();
}

#[cube]
fn combine(a: f32, b: f32, #[comptime] maximum: bool) -> f32 {
    if maximum {
        a.max(b)
    } else {
        a + b
    }
}
