//! The prefill matmul on hardware GPUs: each workgroup computes a tile of `TILE` tokens ×
//! `TILE` output rows, stepping through the columns [`STEP`] at a time. At each step its
//! threads stage the tokens' activations and the rows' dequantized weights in workgroup
//! memory (each loaded once for the whole tile), then every thread adds the products of its
//! [`PER_THREAD`] × [`PER_THREAD`] outputs from there. Its 256 threads and 8 KiB of workgroup
//! memory are within what every WebGPU device offers (256 and 16 KiB).

use cubecl::prelude::CubeDim;

use super::Operands;
use crate::kernels::plan::{KernelPlan, PREFILL_TILE};
use crate::kernels::{buffer, grid};

const TILE: usize = PREFILL_TILE;
/// Columns staged at a step: half a 4-bit block (two code words per row).
const STEP: usize = 16;
/// Tokens, and rows, each thread computes: 16 × 16 threads cover the tile.
const PER_THREAD: usize = 4;
const THREADS: usize = (TILE / PER_THREAD) * (TILE / PER_THREAD);

/// One launch for `ops`.
pub(super) fn launch(ops: &Operands, plan: KernelPlan) {
    let client = &ops.x.client;
    let tiles = ops.rows.div_ceil(TILE) * ops.tokens.div_ceil(TILE);
    macro_rules! launch {
        ($float:ty) => {
            unsafe {
                shader::q4_gemm_kernel::launch_unchecked::<$float>(
                    client,
                    grid(tiles),
                    CubeDim::new_1d(THREADS as u32),
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
                    ops.residual.is_some(),
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

    use super::{PER_THREAD, STEP, THREADS, TILE};
    use crate::kernels::q4::shader::{code_value, scale_in_word, write_output};

    /// `x · Wᵀ` for a tile of `TILE` tokens × `TILE` rows per workgroup (workgroup `g`: row
    /// tile `g % row_tiles`, token tile `g / row_tiles`), then the epilogue. Both staged tiles
    /// are stored column-major (`[STEP][TILE]`), so that the threads of a subgroup, which
    /// differ in their rows, read neighbouring words. Thread `(ty, tx)` computes tokens
    /// `ty + 16·i` and rows `tx + 16·j`. Tokens past the end read zeros; rows past the end
    /// are clamped to the last one; neither is written. Each step's products are summed in
    /// `F` (f32, or f16 where the plan allows), then added to f32 accumulators.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)] // the matmul's operands, shape and epilogue
    pub fn q4_gemm_kernel<F: Float>(
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
        #[comptime] add_residual: bool,
    ) {
        let unit = UNIT_POS as usize;
        let row_tiles = rows.div_ceil(TILE);
        let first_row = (CUBE_POS % row_tiles) * TILE;
        let first_token = (CUBE_POS / row_tiles) * TILE;
        // Uniform across the workgroup, as its barriers require.
        let valid = first_token < tokens;
        let mut staged_x = Shared::<[F]>::new_slice(comptime!(STEP * TILE));
        let mut staged_w = Shared::<[F]>::new_slice(comptime!(STEP * TILE));
        let blocks = cols.div_ceil(32);
        let words = blocks * 4;
        let pairs = blocks.div_ceil(2);
        let x_stride = x.stride(0);
        let lanes = comptime!(TILE / PER_THREAD);
        let tx = unit % lanes;
        let ty = unit / lanes;
        let mut acc = Array::<f32>::new(comptime!(PER_THREAD * PER_THREAD));
        #[unroll]
        for k in 0..comptime!(PER_THREAD * PER_THREAD) {
            acc[k] = f32::new(0.0);
        }
        let mut part = Array::<F>::new(comptime!(PER_THREAD * PER_THREAD));
        // What this thread stages: a code word of one row (the first 2·TILE threads), and
        // STEP·TILE / THREADS activations of one token.
        let word_row = first_row + unit / 2;
        let word_row = select(word_row < rows, word_row, rows - 1);
        let word_half = unit % 2;
        let per_thread_x = comptime!(STEP * TILE / THREADS);
        let x_token = first_token + unit / comptime!(STEP / per_thread_x);
        let x_inside = x_token < tokens;
        let x_token = select(x_inside, x_token, 0usize);
        let x_col = (unit % comptime!(STEP / per_thread_x)) * per_thread_x;
        let steps = select(valid, blocks * 2, 0usize);
        for step in 0..steps {
            let block = step / 2;
            if unit < comptime!(2 * TILE) {
                let word = block * 4 + (step % 2) * 2 + word_half;
                let packed = codes[word_row * words + word];
                let scale = scale_in_word(scales[word_row * pairs + block / 2], block % 2 == 1);
                #[unroll]
                for i in 0..8usize {
                    staged_w[(word_half * 8 + i) * TILE + unit / 2] =
                        F::cast_from(code_value(packed, i) * scale);
                }
            }
            #[unroll]
            for i in 0..per_thread_x {
                let col = step * STEP + x_col + i;
                let inside = x_inside && col < cols;
                let value = x[x_token * x_stride + select(inside, col, 0usize)];
                staged_x[(x_col + i) * TILE + unit / comptime!(STEP / per_thread_x)] =
                    F::cast_from(select(inside, value, f32::new(0.0)));
            }
            sync_cube();
            #[unroll]
            for k in 0..comptime!(PER_THREAD * PER_THREAD) {
                part[k] = F::new(0.0);
            }
            #[unroll]
            for c in 0..STEP {
                #[unroll]
                for i in 0..PER_THREAD {
                    let xv = staged_x[c * TILE + ty + i * lanes];
                    #[unroll]
                    for j in 0..PER_THREAD {
                        part[i * PER_THREAD + j] += xv * staged_w[c * TILE + tx + j * lanes];
                    }
                }
            }
            #[unroll]
            for k in 0..comptime!(PER_THREAD * PER_THREAD) {
                acc[k] += f32::cast_from(part[k]);
            }
            sync_cube();
        }
        #[unroll]
        for i in 0..PER_THREAD {
            #[unroll]
            for j in 0..PER_THREAD {
                let token = first_token + ty + i * lanes;
                let at = first_row + tx + j * lanes;
                if valid && token < tokens && at < rows {
                    write_output(
                        acc[i * PER_THREAD + j],
                        bias,
                        residual,
                        out,
                        at,
                        token,
                        rows,
                        gelu_rows,
                        add_residual,
                    );
                }
            }
        }
    }
}
