//! The decode matmul on hardware GPUs: a workgroup per few output rows, its threads along the
//! columns. Neighbouring threads read neighbouring code words of the same row (coalesced
//! loads), each activation is read once for all the workgroup's rows, and the threads' parts
//! are added through subgroups where the plan has them, else in workgroup memory
//! ([`crate::kernels::reduce`]). A decoded token's LayerNorm runs inside it where the row fits
//! in workgroup memory: one launch instead of two.

use cubecl::client::Client;
use cubecl::prelude::CubeDim;

use super::{Operands, GEMV_MAX_TOKENS};
use crate::kernels::layer_norm::LayerNorm;
use crate::kernels::plan::KernelPlan;
use crate::kernels::reduce::scratch_len;
use crate::kernels::{buffer, cube, grid, WORKGROUP};

/// How the decode kernel shares out its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GemvShape {
    /// Threads per workgroup, along the columns: a power of two holding whole subgroups.
    threads: usize,
    /// Output rows per workgroup: each activation load serves them all.
    rows: usize,
}

impl GemvShape {
    /// `rows` output rows per workgroup (the model's: `DECODE_ROWS_PER_WORKGROUP`) on
    /// `client`'s device, in workgroups of 64 threads (more where a subgroup is wider).
    pub(super) fn new(client: &Client, rows: usize) -> GemvShape {
        let plane_max = client.properties().hardware.plane_size_max.max(1);
        GemvShape {
            threads: WORKGROUP.max(plane_max).next_power_of_two() as usize,
            rows,
        }
    }
}

/// Workgroup memory the kernel needs, in f32 values: the reduction's scratch and, with a
/// LayerNorm inside, the normed row (`staged` values).
fn shared_values(shape: GemvShape, tile: usize, staged: usize) -> usize {
    scratch_len(shape.rows * tile, shape.threads) + staged
}

/// Whether a LayerNorm of `tokens` rows of `cols` fits in the decode kernel of `shape` on
/// `client`'s device: one token, its normed row in workgroup memory beside the reduction's scratch.
pub(super) fn fits_layer_norm(
    client: &Client,
    shape: GemvShape,
    tokens: usize,
    cols: usize,
) -> bool {
    let limit = client.properties().hardware.max_shared_memory_size;
    tokens == 1 && shared_values(shape, 1, cols) * 4 <= limit
}

/// One launch for `ops` (at most [`GEMV_MAX_TOKENS`] tokens), after `norm` (which
/// [`fits_layer_norm`] allowed) when given.
pub(super) fn launch(ops: &Operands, norm: Option<&LayerNorm>, plan: KernelPlan, shape: GemvShape) {
    assert!(
        ops.tokens <= GEMV_MAX_TOKENS,
        "the decode kernel takes a few tokens"
    );
    let client = &ops.x.client;
    let tile = ops.tokens.next_power_of_two();
    let row_groups = ops.rows.div_ceil(shape.rows);
    let (norm_weight, norm_bias, eps, staged) = match norm {
        Some(norm) => (
            cube(norm.weight.clone()),
            cube(norm.bias.clone()),
            norm.eps as f32,
            ops.cols,
        ),
        // Never read without a LayerNorm: the bias stands in.
        None => (ops.bias.clone(), ops.bias.clone(), 0.0, 0),
    };
    macro_rules! launch {
        ($float:ty) => {
            unsafe {
                shader::q4_gemv_kernel::launch_unchecked::<$float>(
                    client,
                    grid(row_groups),
                    CubeDim::new_1d(shape.threads as u32),
                    ops.x.clone().into_tensor_arg(),
                    buffer(&ops.codes),
                    buffer(&ops.scales),
                    buffer(&ops.bias),
                    ops.residual_arg(),
                    buffer(&norm_weight),
                    buffer(&norm_bias),
                    buffer(&ops.out),
                    ops.cols,
                    ops.rows,
                    ops.tokens,
                    ops.gelu_outputs,
                    eps,
                    shape.rows,
                    tile,
                    shape.threads,
                    ops.residual.is_some(),
                    plan.subgroups,
                    staged,
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
    use crate::kernels::reduce::{combine_across_workgroup, scratch_len};

    /// LayerNorm of `x`'s row `token` (`cols` wide) into `normed`, as transformers computes it
    /// (mean, then the biased variance of the differences) and as the LayerNorm kernel does.
    /// Every thread of the workgroup takes part.
    #[cube]
    #[allow(clippy::too_many_arguments)] // a row, the LayerNorm's parameters, the workgroup
    fn normalize_row(
        x: &Tensor<f32>,
        token: usize,
        weight: &[f32],
        bias: &[f32],
        eps: f32,
        cols: usize,
        normed: &mut [f32],
        scratch: &mut [f32],
        #[comptime] threads: usize,
        #[comptime] plane: bool,
    ) {
        let unit = UNIT_POS as usize;
        let base = token * x.stride(0);
        let count = f32::cast_from(cols);
        let mut statistic = Array::<f32>::new(1usize);
        statistic[0] = f32::new(0.0);
        let mut col = unit;
        while col < cols {
            let value = x[base + col];
            normed[col] = value;
            statistic[0] += value;
            col += threads;
        }
        combine_across_workgroup(&mut statistic, scratch, 1usize, threads, plane, false);
        let mean = statistic[0] / count;
        // Each thread reads back only what it wrote.
        statistic[0] = f32::new(0.0);
        col = unit;
        while col < cols {
            let difference = normed[col] - mean;
            statistic[0] += difference * difference;
            col += threads;
        }
        combine_across_workgroup(&mut statistic, scratch, 1usize, threads, plane, false);
        let scale = f32::new(1.0) / (statistic[0] / count + eps).sqrt();
        col = unit;
        while col < cols {
            normed[col] = (normed[col] - mean) * scale * weight[col] + bias[col];
            col += threads;
        }
        sync_cube();
    }

    /// `x · Wᵀ` for `group` output rows and `tile` token columns per workgroup, then the
    /// epilogue. Workgroup `g` takes rows from `g·group`; its `threads` threads stride over the
    /// rows' code words (8 columns each), so neighbouring threads load neighbouring words.
    /// Rows and tokens past the end are clamped to the last one and never written. Each
    /// word's products are summed in `F` (f32, or f16 where the plan allows), scaled into f32
    /// accumulators; the threads' accumulators are then added across the workgroup
    /// (`plane`: through subgroups) and thread `k` writes output `k`.
    /// `staged` > 0 (then `tokens` is 1 and `staged` = `cols`): the row is LayerNorm'ed
    /// (`norm_weight`, `norm_bias`, `eps`) into workgroup memory first and read from there.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)] // the matmul's operands, shape, LayerNorm, epilogue
    pub fn q4_gemv_kernel<F: Float>(
        x: &Tensor<f32>,
        codes: &[u32],
        scales: &[u32],
        bias: &[f32],
        residual: &Tensor<f32>,
        norm_weight: &[f32],
        norm_bias: &[f32],
        out: &mut [f32],
        cols: usize,
        rows: usize,
        tokens: usize,
        gelu_rows: usize,
        eps: f32,
        #[comptime] group: usize,
        #[comptime] tile: usize,
        #[comptime] threads: usize,
        #[comptime] add_residual: bool,
        #[comptime] plane: bool,
        #[comptime] staged: usize,
    ) {
        let unit = UNIT_POS as usize;
        let row = CUBE_POS * group;
        // Uniform across the workgroup, as its barriers require: a wrapped grid's extra
        // workgroups run an empty loop and write nothing.
        let valid = row < rows;
        let mut scratch = Shared::<[f32]>::new_slice(comptime!(scratch_len(group * tile, threads)));
        let mut normed = Shared::<[f32]>::new_slice(comptime!(staged.max(1)));
        if staged > 0 {
            normalize_row(
                x,
                0,
                norm_weight,
                norm_bias,
                eps,
                cols,
                &mut normed,
                &mut scratch,
                threads,
                plane,
            );
        }
        let blocks = cols.div_ceil(32);
        let words = blocks * 4;
        let pairs = blocks.div_ceil(2);
        let x_stride = x.stride(0);
        let mut row_at = Array::<usize>::new(group);
        #[unroll]
        for r in 0..group {
            row_at[r] = select(row + r < rows, row + r, rows - 1);
        }
        let mut acc = Array::<f32>::new(group * tile);
        #[unroll]
        for k in 0..group * tile {
            acc[k] = f32::new(0.0);
        }
        let mut activations = Array::<F>::new(tile * 8);
        let end = select(valid, words, 0usize);
        let mut word = unit;
        while word < end {
            let block = word / 4;
            let base = word * 8;
            #[unroll]
            for t in 0..tile {
                let token = select(t < tokens, t, tokens - 1);
                #[unroll]
                for i in 0..8usize {
                    // Columns past the row's end (in its last block) count as 0.
                    let inside = base + i < cols;
                    let col = select(inside, base + i, 0usize);
                    let value = if staged > 0 {
                        normed[col]
                    } else {
                        x[token * x_stride + col]
                    };
                    activations[t * 8 + i] = F::cast_from(select(inside, value, f32::new(0.0)));
                }
            }
            #[unroll]
            for r in 0..group {
                let packed = codes[row_at[r] * words + word];
                let scale = scale_in_word(scales[row_at[r] * pairs + block / 2], block % 2 == 1);
                #[unroll]
                for t in 0..tile {
                    let mut part = F::new(0.0);
                    #[unroll]
                    for i in 0..8usize {
                        part += F::cast_from(code_value(packed, i)) * activations[t * 8 + i];
                    }
                    acc[r * tile + t] += f32::cast_from(part) * scale;
                }
            }
            word += threads;
        }
        combine_across_workgroup(&mut acc, &mut scratch, group * tile, threads, plane, false);
        #[unroll]
        for k in 0..group * tile {
            let at = row + comptime!(k / tile);
            let token = comptime!(k % tile);
            if valid && unit == k && at < rows && token < tokens {
                write_output(
                    acc[k],
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
