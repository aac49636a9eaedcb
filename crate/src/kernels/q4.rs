//! The 4-bit matrix multiplication (with its epilogue) and the row lookup of a 4-bit table,
//! straight from the packed weights ([`crate::quant`] layout): kernels on GPU backends, host
//! loops on burn's CPU backend ([`Q4Matrix::matmul`]).

use std::sync::Arc;

#[cfg(feature = "gpu")]
use burn::backend::Cube;
#[cfg(feature = "gpu")]
use burn::tensor::{DType, Int};
use burn::tensor::{Device, Tensor, TensorData};
#[cfg(feature = "gpu")]
use cubecl::prelude::CubeDim;

use super::plan::KernelPlan;
#[cfg(feature = "gpu")]
use super::plan::{shared_load_lanes, SOFTWARE_ROWS_PER_WORKER};
use super::Epilogue;
#[cfg(feature = "gpu")]
use super::{
    buffer, cube, empty_output, grid, is_cpu, subgroup_workgroup, SOFTWARE_WORKGROUP, WORKGROUP,
};
use crate::quant::Q4Matrix;

/// Tokens a matmul thread (or subgroup) handles together in a prefill.
#[cfg(feature = "gpu")]
const PREFILL_TILE: usize = 8;

/// Tokens a matmul thread handles together in a prefill on a software adapter: 8 was faster
/// still, but lavapipe took several times as long to compile that shader (BENCHMARKS.md).
#[cfg(feature = "gpu")]
const SOFTWARE_PREFILL_TILE: usize = 4;

/// A 4-bit weight `[rows = out features, cols = in features]` where the model runs.
#[allow(clippy::large_enum_variant)] // a few per model, not worth a box
pub enum Q4Weight {
    /// Codes and f16-pair scale words as u32 tensors on a GPU device.
    #[cfg(feature = "gpu")]
    Device {
        codes: Tensor<1, Int>,
        scales: Tensor<1, Int>,
        rows: usize,
        cols: usize,
    },
    /// On the CPU backend the packed matrix stays in host memory.
    Host(Arc<Q4Matrix>),
}

impl Q4Weight {
    #[cfg_attr(not(feature = "gpu"), allow(unused_variables))] // device: a GPU's only
    pub fn upload(matrix: Q4Matrix, device: &Device) -> Self {
        #[cfg(feature = "gpu")]
        if !is_cpu(device) {
            return Q4Weight::on_gpu(matrix, device);
        }
        Q4Weight::Host(Arc::new(matrix))
    }

    #[cfg(feature = "gpu")]
    fn on_gpu(matrix: Q4Matrix, device: &Device) -> Self {
        let words = |w: Vec<u32>| {
            let len = w.len();
            Tensor::<1, Int>::from_data(TensorData::new(w, [len]), (device, DType::U32))
        };
        let scales = words(matrix.row_scale_words());
        Q4Weight::Device {
            rows: matrix.rows,
            cols: matrix.cols,
            codes: words(matrix.codes),
            scales,
        }
    }

    pub fn rows(&self) -> usize {
        self.shape()[0]
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            #[cfg(feature = "gpu")]
            Q4Weight::Device { rows, cols, .. } => [*rows, *cols],
            Q4Weight::Host(m) => [m.rows, m.cols],
        }
    }

    /// The weight in f32, `[cols, rows]` (the model's f32 layout, input features first).
    pub fn to_f32(&self, device: &Device) -> Tensor<2> {
        let ids: Vec<u32> = (0..self.rows() as u32).collect();
        self.rows_of(&ids, device).transpose()
    }

    /// Rows `ids` of the matrix, dequantized: `[ids.len(), cols]` (an embedding lookup; the
    /// table itself is never expanded).
    pub fn rows_of(&self, ids: &[u32], device: &Device) -> Tensor<2> {
        match self {
            #[cfg(feature = "gpu")]
            Q4Weight::Device {
                codes,
                scales,
                cols,
                ..
            } => gpu_rows(ids, codes, scales, *cols, device),
            Q4Weight::Host(matrix) => {
                let rows: Vec<f32> = ids
                    .iter()
                    .flat_map(|&id| matrix.dequantize_row(id as usize))
                    .collect();
                Tensor::from_data(TensorData::new(rows, [ids.len(), matrix.cols]), device)
            }
        }
    }

    /// `x · Wᵀ + bias` for `x: [tokens, cols]`, then `then`, giving `[tokens, rows]`: on a GPU
    /// one launch of the kernels `plan` names (which the device must support: see
    /// [`KernelPlan::supported`]); on the CPU backend the host loop.
    #[cfg_attr(not(feature = "gpu"), allow(unused_variables))] // plan: the kernels'
    pub fn matmul(
        &self,
        x: Tensor<2>,
        bias: &Tensor<1>,
        then: Epilogue,
        plan: KernelPlan,
    ) -> Tensor<2> {
        match self {
            #[cfg(feature = "gpu")]
            Q4Weight::Device {
                codes,
                scales,
                rows,
                cols,
            } => gpu_matmul(x, codes, scales, bias, *rows, *cols, then, plan),
            Q4Weight::Host(matrix) => then.apply(cpu_matmul(x, matrix, bias)),
        }
    }
}

/// The CPU backend's matmul: the host loop over `x`'s values.
fn cpu_matmul(x: Tensor<2>, matrix: &Q4Matrix, bias: &Tensor<1>) -> Tensor<2> {
    let device = x.device();
    let [tokens, _] = x.dims();
    // burn's CPU backend computes eagerly: its read-backs complete at once, also in wasm.
    let read = |t: Tensor<2>| {
        burn::tensor::try_read_sync(t.into_data_async())
            .expect("the CPU backend reads synchronously")
            .expect("reading a CPU tensor")
            .try_to_vec::<f32>()
            .expect("f32 tensor")
    };
    let mut out = matrix.matmul(&read(x), tokens);
    let bias = read(bias.clone().unsqueeze::<2>());
    for row in out.chunks_exact_mut(matrix.rows) {
        for (y, b) in row.iter_mut().zip(&bias) {
            *y += b;
        }
    }
    Tensor::from_data(TensorData::new(out, [tokens, matrix.rows]), &device)
}

#[cfg(feature = "gpu")]
fn gpu_rows(
    ids: &[u32],
    codes: &Tensor<1, Int>,
    scales: &Tensor<1, Int>,
    cols: usize,
    device: &Device,
) -> Tensor<2> {
    let tokens = ids.len();
    let ids = Tensor::<1, Int>::from_data(
        TensorData::new(ids.to_vec(), [tokens]),
        (device, DType::U32),
    );
    let [ids, codes, scales] = [&ids, codes, scales].map(|t| cube(t.clone()));
    let client = codes.client.clone();
    let out = empty_output(&codes, [tokens, cols], DType::F32);
    unsafe {
        shader::q4_rows_kernel::launch_unchecked(
            &client,
            grid((tokens * cols).div_ceil(WORKGROUP as usize)),
            CubeDim::new_1d(WORKGROUP),
            buffer(&ids),
            buffer(&codes),
            buffer(&scales),
            buffer(&out),
            cols,
            tokens,
        );
    }
    Tensor::from_primitive::<Cube>(out)
}

#[allow(clippy::too_many_arguments)] // a weight's parts, the input and how to run it
#[cfg(feature = "gpu")]
fn gpu_matmul(
    x: Tensor<2>,
    codes: &Tensor<1, Int>,
    scales: &Tensor<1, Int>,
    bias: &Tensor<1>,
    rows: usize,
    cols: usize,
    then: Epilogue,
    plan: KernelPlan,
) -> Tensor<2> {
    let [tokens, _] = x.dims();
    debug_assert_eq!(x.dims()[1], cols);
    let x = cube(x);
    assert_eq!(x.meta.strides()[1], 1, "matmul: x needs unit column stride");
    let residual = then.residual.map(cube);
    let [codes, scales] = [codes, scales].map(|t| cube(t.clone()));
    let bias = cube(bias.clone());
    let client = x.client.clone();
    let out = empty_output(&x, [tokens, rows], DType::F32);
    let share = match plan.shared_loads {
        true => shared_load_lanes(&client).expect("shared loads need one known subgroup size"),
        false => 0,
    };
    // A prefill reuses each weight word across a group of tokens; decoding has one.
    let (group, prefill_tile) = match plan.software {
        true => (SOFTWARE_ROWS_PER_WORKER, SOFTWARE_PREFILL_TILE),
        false => (1, PREFILL_TILE),
    };
    let tile = if tokens > 1 { prefill_tile } else { 1 };
    // One worker per group of rows of a tile of tokens; with shared loads as many more
    // (computing nothing) as make whole subgroups: a subgroup's lanes share their tokens'
    // activations, so no subgroup may mix tiles.
    let workers_per_tile = match share {
        0 => rows.div_ceil(group),
        lanes => rows.div_ceil(group).next_multiple_of(lanes),
    };
    let groups = workers_per_tile * tokens.div_ceil(tile);
    let (count, dim) = if plan.subgroups {
        // Enough planes for every group even with the largest subgroup the adapter reports.
        let (threads, plane_max) = subgroup_workgroup(&client);
        let planes = (threads / plane_max) as usize;
        (groups.div_ceil(planes), threads)
    } else {
        let threads = if plan.software {
            SOFTWARE_WORKGROUP
        } else {
            WORKGROUP
        };
        (groups.div_ceil(threads as usize), threads)
    };
    let count = grid(count);
    let dim = CubeDim::new_1d(dim);
    // Without a residual the kernel never reads that binding: `x` stands in.
    let residual_arg = residual
        .clone()
        .unwrap_or_else(|| x.clone())
        .into_tensor_arg();
    macro_rules! launch {
        ($float:ty) => {
            unsafe {
                shader::q4_matmul_kernel::launch_unchecked::<$float>(
                    &client,
                    count,
                    dim,
                    x.into_tensor_arg(),
                    buffer(&codes),
                    buffer(&scales),
                    buffer(&bias),
                    residual_arg,
                    buffer(&out),
                    cols,
                    rows,
                    tokens,
                    then.gelu_outputs,
                    workers_per_tile,
                    group,
                    tile,
                    residual.is_some(),
                    plan.subgroups,
                    // Shifts are cheap on GPUs; 16^±7 does not fit f16.
                    plan.software && !plan.f16,
                    share,
                )
            }
        };
    }
    match plan.f16 {
        false => launch!(f32),
        true => launch!(half::f16),
    }
    Tensor::from_primitive::<Cube>(out)
}

#[cfg(feature = "gpu")]
mod shader {
    use cubecl::prelude::*;

    /// The scale of block `block` of row `row` of a matrix `cols` wide: two f16 scales per
    /// word, each row starting on a word of its own ([`crate::quant::Q4Matrix::row_scale_words`]).
    #[cube]
    fn block_scale(scales: &[u32], row: usize, block: usize, cols: usize) -> f32 {
        scale_in_word(scales[row * cols.div_ceil(64) + block / 2], block % 2 == 1)
    }

    /// The f16 scale in the low (or `high`) half of a scale word, as f32, without `shader-f16`
    /// and without shifts (see [`add_block_pair`]): masks pick the half's bits where they are,
    /// and a multiplication through f32 (exact: 15 significant bits) moves sign, exponent and
    /// mantissa to their f32 places. Zero and subnormals (never produced by the quantizer except
    /// zero) read as 0.
    #[cube]
    fn scale_in_word(word: u32, high: bool) -> f32 {
        let sign = (word & select(high, 0x8000_0000u32, 0x8000u32)) * select(high, 1u32, 65536u32);
        let magnitude = f32::cast_from(i32::cast_from(
            word & select(high, 0x7fff_0000u32, 0x7fffu32),
        ));
        let to_f32_place = select(high, f32::new(0.125), f32::new(8192.0));
        let moved = u32::cast_from(i32::cast_from(magnitude * to_f32_place));
        // f16's exponent bias is 15, f32's 127.
        let normal = sign | (moved + 0x3800_0000u32);
        let exponent = word & select(high, 0x7c00_0000u32, 0x7c00u32);
        f32::reinterpret(select(exponent != 0u32, normal, sign))
    }

    /// The signed value (-8..7) of code `i` (0..8) of a packed word, low nibble first.
    #[cube]
    fn code_value(packed: u32, i: usize) -> f32 {
        f32::cast_from((packed >> u32::cast_from(i * 4)) & 15u32) - f32::new(8.0)
    }

    /// One thread per output value: row `ids[t]`, column `c` of the table.
    #[cube(launch_unchecked)]
    pub fn q4_rows_kernel(
        ids: &[u32],
        codes: &[u32],
        scales: &[u32],
        out: &mut [f32],
        cols: usize,
        tokens: usize,
    ) {
        let index = ABSOLUTE_POS;
        if index < tokens * cols {
            let row = usize::cast_from(ids[index / cols]);
            let col = index % cols;
            let words_per_row = cols.div_ceil(32) * 4;
            let packed = codes[row * words_per_row + col / 8];
            out[index] = code_value(packed, col % 8) * block_scale(scales, row, col / 32, cols);
        }
    }

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

    /// GELU, tanh approximation, as transformers' `gelu_new`. The tanh argument is clamped to
    /// ±15, where f32 tanh is already ±1: some shader compilers' tanh overflows to NaN beyond.
    #[cube]
    fn gelu_tanh(x: f32) -> f32 {
        let inner = f32::new(0.797_884_6) * (x + f32::new(0.044715) * x * x * x);
        let t = inner.clamp(f32::new(-15.0), f32::new(15.0)).tanh();
        f32::new(0.5) * x * (f32::new(1.0) + t)
    }

    /// Writes the outputs of the `group` rows from `row` and the `tile` tokens from `first`
    /// that exist: bias added, GELU on rows below `gelu_rows`, then the residual (when
    /// `add_residual`).
    #[cube]
    #[allow(clippy::too_many_arguments)] // a group's outputs and what follows the matmul
    fn finish(
        acc: &Array<f32>,
        bias: &[f32],
        residual: &Tensor<f32>,
        out: &mut [f32],
        row: usize,
        rows: usize,
        first: usize,
        tokens: usize,
        gelu_rows: usize,
        #[comptime] group: usize,
        #[comptime] tile: usize,
        #[comptime] add_residual: bool,
    ) {
        #[unroll]
        for r in 0..group {
            let at = row + r;
            #[unroll]
            for t in 0..tile {
                let token = first + t;
                if at < rows && token < tokens {
                    let mut y = acc[r * tile + t] + bias[at];
                    if at < gelu_rows {
                        y = gelu_tanh(y);
                    }
                    if add_residual {
                        y += residual[token * residual.stride(0) + at * residual.stride(1)];
                    }
                    out[token * rows + at] = y;
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
    pub fn q4_matmul_kernel<F: Float>(
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
            finish(
                &acc,
                bias,
                residual,
                out,
                row,
                rows,
                first,
                tokens,
                gelu_rows,
                group,
                tile,
                add_residual,
            );
        }
    }
}
