//! The 4-bit matmul shaped for software adapters (a CPU emulating a GPU: llvmpipe, lavapipe,
//! SwiftShader), where loads, not arithmetic, set the speed: each thread (or subgroup) a group
//! of output rows for a tile of tokens, reading each activation once for all its rows and each
//! weight word once for all its tokens. Plans with the software shape run it
//! ([`KernelPlan::software`]); the others run [`super::gemv`] and [`super::gemm`].

use cubecl::prelude::CubeDim;

use super::Operands;
use crate::kernels::plan::{shared_load_lanes, KernelPlan, SOFTWARE_ROWS_PER_WORKER};
use crate::kernels::{buffer, grid, subgroup_workgroup, SOFTWARE_WORKGROUP};

/// Tokens a matmul thread handles together in a prefill: 8 was faster still, but lavapipe
/// took several times as long to compile that shader (BENCHMARKS.md).
const PREFILL_TILE: usize = 4;

/// One launch of [`shader::q4_per_row_kernel`] for `ops`, shaped as `plan` (a software plan)
/// says.
pub(super) fn launch(ops: &Operands, plan: KernelPlan) {
    debug_assert!(
        plan.software,
        "the per-row kernel is shaped for software adapters"
    );
    let client = &ops.x.client;
    let share = match plan.shared_loads {
        true => shared_load_lanes(client).expect("shared loads need one known subgroup size"),
        false => 0,
    };
    let group = SOFTWARE_ROWS_PER_WORKER;
    // A prefill reuses each weight word across a tile of tokens; decoding has one.
    let tile = if ops.tokens > 1 { PREFILL_TILE } else { 1 };
    // One worker per group of rows of a tile of tokens; with shared loads as many more
    // (computing nothing) as make whole subgroups: a subgroup's lanes share their tokens'
    // activations, so no subgroup may mix tiles.
    let workers_per_tile = match share {
        0 => ops.rows.div_ceil(group),
        lanes => ops.rows.div_ceil(group).next_multiple_of(lanes),
    };
    let groups = workers_per_tile * ops.tokens.div_ceil(tile);
    let (count, dim) = if plan.subgroups {
        // Enough planes for every group even with the largest subgroup the adapter reports.
        let (threads, plane_max) = subgroup_workgroup(client);
        let planes = (threads / plane_max) as usize;
        (groups.div_ceil(planes), threads)
    } else {
        let threads = SOFTWARE_WORKGROUP;
        (groups.div_ceil(threads as usize), threads)
    };
    let count = grid(count);
    let dim = CubeDim::new_1d(dim);
    macro_rules! launch {
        ($float:ty) => {
            unsafe {
                shader::q4_per_row_kernel::launch_unchecked::<$float>(
                    client,
                    count,
                    dim,
                    ops.x.clone().into_tensor_arg(),
                    buffer(&ops.codes),
                    buffer(&ops.scales),
                    buffer(&ops.bias),
                    ops.residual_arg(),
                    buffer(&ops.out),
                    ops.cols,
                    ops.rows,
                    ops.tokens,
                    ops.gelu_outputs,
                    workers_per_tile,
                    group,
                    tile,
                    ops.residual.is_some(),
                    plan.subgroups,
                    // 16^±7 does not fit f16.
                    !plan.f16,
                    share,
                )
            }
        };
    }
    match plan.f16 {
        false => launch!(f32),
        true => launch!(half::f16),
    }
}

mod shader {
    use cubecl::prelude::*;

    use crate::kernels::q4::shader::{code_value, scale_in_word, write_output};

    /// Adds one pair of blocks' share (64 columns: 8 packed words; each row's two scales share
    /// a word, loaded once) of `x · Wᵀ` for `group` rows from `row` and `tile` tokens from
    /// `first` to their accumulators (`acc[r * tile + t]`). Rows and tokens past the end are
    /// clamped to the last one: a worker's extra rows and tokens compute copies that are never
    /// written. Each activation is loaded once for all the rows and each word once for all the
    /// tokens: on adapters that emulate a GPU on a CPU every load is a loop over the lanes, and
    /// loads are the cost. The products and each word's sum are in `F` (f32, or f16 where the
    /// adapter has `shader-f16`), each block's sum in f32, scaled once.
    ///
    /// `scaled` (f32 only) unpacks without shifts: code i's nibble masked in place, less 8
    /// there, is its value times 16^i (exactly, also in f32), and its activation times 16^-i
    /// makes the same product. SwiftShader's JIT (Subzero) runs every vector shift lane by
    /// lane; masks, a subtraction and a signed conversion are whole-vector instructions.
    ///
    /// `share` (a subgroup size dividing 8; 0: off): the subgroup's lanes load a word's 8
    /// activations between them, `8 / share` each, and hand them round with `subgroupBroadcast`
    /// (a register move on a CPU), instead of each loading all 8. Every lane of the subgroup
    /// must get here together; they all work on the same columns and tokens.
    #[cube]
    #[allow(clippy::too_many_arguments)] // two blocks of a group of rows, for a group of tokens
    fn add_block_pair<F: Float>(
        x: &Tensor<f32>,
        codes: &[u32],
        scales: &[u32],
        row: usize,
        rows: usize,
        pair: usize,
        first: usize,
        tokens: usize,
        cols: usize,
        x_stride: usize,
        acc: &mut Array<f32>,
        #[comptime] group: usize,
        #[comptime] tile: usize,
        #[comptime] scaled: bool,
        #[comptime] share: usize,
    ) {
        let blocks = cols.div_ceil(32);
        // With `share`: this lane's activations of the current word, `slots` per token (when
        // off, `max(1)` only keeps the unused expressions valid).
        let slots = comptime!(8 / share.max(1));
        let mut shared = Array::<f32>::new(comptime!(if share > 0 { tile * slots } else { 1 }));
        let mut lane = 0usize;
        if share > 0 {
            lane = usize::cast_from(UNIT_POS_PLANE);
        }
        let mut row_at = Array::<usize>::new(group);
        let mut scale_words = Array::<u32>::new(group);
        #[unroll]
        for r in 0..group {
            row_at[r] = select(row + r < rows, row + r, rows - 1);
            scale_words[r] = scales[row_at[r] * blocks.div_ceil(2) + pair];
        }
        let mut sums = Array::<f32>::new(group * tile);
        let mut packed = Array::<u32>::new(group);
        let mut values = Array::<F>::new(group);
        let mut parts = Array::<F>::new(group * tile);
        // A row with an odd number of blocks has one in its last pair.
        let halves = select(pair * 2 + 1 < blocks, 2usize, 1usize);
        for half in 0..halves {
            let block = pair * 2 + half;
            #[unroll]
            for k in 0..group * tile {
                sums[k] = f32::new(0.0);
            }
            for w in 0..4usize {
                #[unroll]
                for r in 0..group {
                    packed[r] = codes[(row_at[r] * blocks + block) * 4 + w];
                }
                #[unroll]
                for k in 0..group * tile {
                    parts[k] = F::new(0.0);
                }
                let base = block * 32 + w * 8;
                if share > 0 {
                    #[unroll]
                    for t in 0..tile {
                        let token = select(first + t < tokens, first + t, tokens - 1);
                        #[unroll]
                        for k in 0..slots {
                            let col = base + k * share + lane;
                            let inside = col < cols;
                            let at = token * x_stride + select(inside, col, 0usize);
                            shared[t * slots + k] = select(inside, x[at], f32::new(0.0));
                        }
                    }
                }
                // For `scaled`: code i's mask, its offset (8 in place) and 16^-i.
                let mut mask = 15u32;
                let mut offset = 8u32;
                let mut scale = f32::new(1.0);
                #[unroll]
                for i in 0..8usize {
                    #[unroll]
                    for r in 0..group {
                        if scaled {
                            // Wrapping u32: for code 7 the difference is its value's two's
                            // complement, read as i32.
                            let value = i32::cast_from((packed[r] & mask) - offset);
                            values[r] = F::cast_from(value);
                        } else {
                            values[r] = F::cast_from(code_value(packed[r], i));
                        }
                    }
                    #[unroll]
                    for t in 0..tile {
                        let mut xv = if share > 0 {
                            plane_broadcast(
                                shared[t * slots + comptime!(i / share.max(1))],
                                comptime!((i % share.max(1)) as u32),
                            )
                        } else {
                            // Columns past the row's end (in its last block) read column 0 and
                            // count as 0: a select per activation, not a second copy of the
                            // loop to compile.
                            let inside = base + i < cols;
                            let token = select(first + t < tokens, first + t, tokens - 1);
                            let at = token * x_stride + select(inside, base + i, 0usize);
                            select(inside, x[at], f32::new(0.0))
                        };
                        if scaled {
                            xv *= scale;
                        }
                        let xv = F::cast_from(xv);
                        #[unroll]
                        for r in 0..group {
                            parts[r * tile + t] += values[r] * xv;
                        }
                    }
                    if scaled {
                        mask *= 16u32;
                        offset *= 16u32;
                        scale *= f32::new(0.0625);
                    }
                }
                #[unroll]
                for k in 0..group * tile {
                    sums[k] += f32::cast_from(parts[k]);
                }
            }
            #[unroll]
            for r in 0..group {
                let scale = scale_in_word(scale_words[r], half == 1);
                #[unroll]
                for t in 0..tile {
                    acc[r * tile + t] += sums[r * tile + t] * scale;
                }
            }
        }
    }

    /// `x · Wᵀ` for `group` output rows × `tile` tokens per worker, then the epilogue. A
    /// prefill reads and unpacks each weight word once per group of tokens instead of once per
    /// token; a group of rows reads each activation once for all its rows.
    /// `x` has unit column stride. Worker `w` takes group `w % workers_per_tile` of rows and tile
    /// `w / workers_per_tile` of tokens (`workers_per_tile` ≥ the groups: see `share`).
    /// - `plane` false: a worker is one thread, looping over its rows block by block. Needs
    ///   nothing beyond core WebGPU.
    /// - `plane` true: a worker is one subgroup, whose lanes stride over the rows' block pairs
    ///   (so neighbouring lanes read neighbouring 32-byte pairs) and add their parts with
    ///   `plane_sum`. Correct for any subgroup size: the plane's position and stride come from
    ///   `PLANE_DIM` at run time. Every lane reaches `plane_sum`, as WGSL's uniformity rule
    ///   requires: workers past the end run empty loops and write nothing.
    /// - `scaled`: codes unpacked without shifts (see [`add_block_pair`]); f32 products only.
    /// - `share`: activations loaded by the subgroup's lanes together (see [`add_block_pair`]);
    ///   not with `plane`. The lanes must then share their tokens (each tile's workers are
    ///   padded to whole subgroups), and workers past the end run the loop too, with their
    ///   subgroup's tokens, writing nothing.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)] // the matmul's operands, shape and epilogue
    pub fn q4_per_row_kernel<F: Float>(
        x: &Tensor<f32>,
        codes: &[u32],
        scales: &[u32],
        bias: &[f32],
        residual: &Tensor<f32>,
        out: &mut [f32],
        cols: usize,
        rows: usize,
        tokens: usize,
        gelu_rows: usize,
        workers_per_tile: usize,
        #[comptime] group: usize,
        #[comptime] tile: usize,
        #[comptime] add_residual: bool,
        #[comptime] plane: bool,
        #[comptime] scaled: bool,
        #[comptime] share: usize,
    ) {
        let mut worker = ABSOLUTE_POS;
        let mut lane = 0usize;
        let mut lanes = 1usize;
        if plane {
            let planes_per_cube = usize::cast_from(CUBE_DIM / PLANE_DIM);
            worker = CUBE_POS * planes_per_cube + usize::cast_from(UNIT_POS / PLANE_DIM);
            lane = usize::cast_from(UNIT_POS_PLANE);
            lanes = usize::cast_from(PLANE_DIM);
        }
        let row_groups = rows.div_ceil(group);
        let tiles = tokens.div_ceil(tile);
        let valid = worker < workers_per_tile * tiles && worker % workers_per_tile < row_groups;
        let row = (worker % workers_per_tile) * group;
        let first = (worker / workers_per_tile) * tile;
        // Who runs the loop: the valid workers; with `share` every worker of a workgroup that
        // has a valid one (the padding loads activations for the others, rows and tokens
        // clamped in `add_block_pair`). The test must be uniform across the workgroup, as WGSL
        // requires of control flow around `subgroupBroadcast`: only whole workgroups past the
        // end skip it (a long prompt's grid wraps into a second row of workgroups).
        let runs = if share > 0 {
            CUBE_POS * (CUBE_DIM as usize) < workers_per_tile * tiles
        } else {
            valid
        };
        let end = select(runs, cols.div_ceil(64), 0usize);
        let mut acc = Array::<f32>::new(group * tile);
        #[unroll]
        for k in 0..group * tile {
            acc[k] = f32::new(0.0);
        }
        // Read once: every `x.stride(0)` in the loop would be another storage load.
        let x_stride = x.stride(0);
        let mut pair = lane;
        while pair < end {
            add_block_pair::<F>(
                x, codes, scales, row, rows, pair, first, tokens, cols, x_stride, &mut acc, group,
                tile, scaled, share,
            );
            pair += lanes;
        }
        if plane {
            #[unroll]
            for k in 0..group * tile {
                acc[k] = plane_sum(acc[k]);
            }
        }
        if valid && lane == 0 {
            #[unroll]
            for r in 0..group {
                #[unroll]
                for t in 0..tile {
                    if row + r < rows && first + t < tokens {
                        write_output(
                            acc[r * tile + t],
                            bias,
                            residual,
                            out,
                            row + r,
                            first + t,
                            rows,
                            gelu_rows,
                            add_residual,
                        );
                    }
                }
            }
        }
    }
}
