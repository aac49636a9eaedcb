//! Our GPU kernels (cubecl: wgpu natively, WebGPU in the browser) and their CPU counterparts.
//! - 4-bit matrix multiplication straight from the packed weights ([`crate::quant`] layout),
//!   with its bias, activation and residual: a kernel on GPU backends, a plain loop on burn's
//!   CPU backend. No float copy of a weight is made (unless a layer mixes 4-bit and f32
//!   parts).
//! - Embedding rows of a 4-bit table.
//! - The decode path's other fused steps: LayerNorm, and causal attention with the rotary
//!   embedding and the KV-cache write inside (burn's CPU backend composes these from tensor
//!   ops in [`crate::model`]).
//! - The plain copy behind the benchmark's bandwidth figure.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use burn::backend::wgpu::CubeTensor;
use burn::backend::{Cube, DispatchDevice};
use burn::tensor::kind::Basic;
use burn::tensor::{BackendPrimitive, DType, Device, Int, Shape, Tensor, TensorData};
use cubecl::client::Client;
use cubecl::features::{Plane, TypeUsage};
use cubecl::ir::{ElemType, FloatKind};
use cubecl::prelude::{BufferArg, CubeCount, CubeDim};

use crate::quant::{padded_cols, Q4Matrix, BLOCK};

/// Threads per workgroup (at least one subgroup for the subgroup kernel).
const WORKGROUP: u32 = 64;

/// Tokens a matmul thread (or subgroup) handles together in a prefill.
const PREFILL_TILE: usize = 8;

/// Output rows a matmul thread handles on a software adapter (a CPU emulating a GPU: llvmpipe,
/// SwiftShader). There every buffer load is a loop over the SIMD lanes (llvmpipe inserts each
/// lane's value through the stack), so loads, not arithmetic, set the speed. A thread that
/// reads each activation once for 16 rows made a 10240 × 2560 matmul 3.9× faster for one token
/// on lavapipe and 7.6× for 64. A GPU needs the threads instead: one row each.
const SOFTWARE_ROWS_PER_WORKER: usize = 16;
/// Tokens a matmul thread handles together in a prefill on a software adapter: 8 was faster
/// still, but lavapipe took 9 s to compile that shader (2 s for 4).
const SOFTWARE_PREFILL_TILE: usize = 4;
/// Threads per workgroup on a software adapter: the widest SIMD vector they emulate with
/// (llvmpipe's 8 f32 lanes on AVX2). A software adapter shares workgroups out among its few
/// CPU cores; 64-thread ones left a core idle for a quarter of a 2560-row matmul on 2 cores.
const SOFTWARE_WORKGROUP: u32 = 8;

/// A 4-bit weight `[rows = out features, cols = in features]` where the model runs.
#[allow(clippy::large_enum_variant)] // a few per model, not worth a box
pub enum Q4Weight {
    /// Codes and f16-pair scale words as u32 tensors on a GPU device.
    Device {
        codes: Tensor<1, Int>,
        scales: Tensor<1, Int>,
        rows: usize,
        cols: usize,
        plan: KernelPlan,
    },
    /// On the CPU backend the packed matrix stays in host memory.
    Host(Arc<Q4Matrix>),
}

pub fn is_cpu(device: &Device) -> bool {
    matches!(device.as_dispatch(), DispatchDevice::Flex(_))
}

impl Q4Weight {
    pub fn upload(matrix: Q4Matrix, device: &Device) -> Self {
        if is_cpu(device) {
            return Q4Weight::Host(Arc::new(matrix));
        }
        let words = |w: Vec<u32>| {
            let len = w.len();
            Tensor::<1, Int>::from_data(TensorData::new(w, [len]), (device, DType::U32))
        };
        let scales = words(matrix.row_scale_words());
        Q4Weight::Device {
            plan: KernelPlan::best(device).unwrap_or(KernelPlan::PORTABLE),
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
            Q4Weight::Device { rows, cols, .. } => [*rows, *cols],
            Q4Weight::Host(m) => [m.rows, m.cols],
        }
    }

    /// The weight in f32, `[cols, rows]` (the model's dense layout, input features first).
    pub fn to_dense(&self, device: &Device) -> Tensor<2> {
        let ids: Vec<u32> = (0..self.rows() as u32).collect();
        self.rows_of(&ids, device).transpose()
    }

    /// Rows `ids` of the matrix, dequantized: `[ids.len(), cols]` (an embedding lookup; the
    /// table itself is never expanded).
    pub fn rows_of(&self, ids: &[u32], device: &Device) -> Tensor<2> {
        match self {
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

    /// `x · Wᵀ + bias` for `x: [tokens, cols]`, then `then`, giving `[tokens, rows]`, with
    /// the device's best kernels.
    pub fn matmul(&self, x: Tensor<2>, bias: &Tensor<1>, then: Epilogue) -> Tensor<2> {
        let plan = match self {
            Q4Weight::Device { plan, .. } => *plan,
            Q4Weight::Host(_) => KernelPlan::PORTABLE,
        };
        self.matmul_with(x, bias, then, plan)
    }

    /// [`Self::matmul`] with the kernels of `plan` (which the device must support; see
    /// [`KernelPlan::supported`]). The CPU backend has one way only.
    pub fn matmul_with(
        &self,
        x: Tensor<2>,
        bias: &Tensor<1>,
        then: Epilogue,
        plan: KernelPlan,
    ) -> Tensor<2> {
        match self {
            Q4Weight::Device {
                codes,
                scales,
                rows,
                cols,
                ..
            } => gpu_matmul(x, codes, scales, bias, *rows, *cols, then, plan),
            Q4Weight::Host(matrix) => then.apply(cpu_matmul(x, matrix, bias)),
        }
    }
}

fn cpu_matmul(x: Tensor<2>, matrix: &Q4Matrix, bias: &Tensor<1>) -> Tensor<2> {
    let device = x.device();
    let [tokens, cols] = x.dims();
    // burn's CPU backend computes eagerly: its read-backs complete at once, also in wasm.
    let read = |t: Tensor<2>| {
        burn::tensor::try_read_sync(t.into_data_async())
            .expect("the CPU backend reads synchronously")
            .expect("reading a CPU tensor")
            .try_to_vec::<f32>()
            .expect("f32 tensor")
    };
    let xs = read(x);
    let bias = read(bias.clone().unsqueeze::<2>());
    let rows = matrix.rows;
    let words_per_row = padded_cols(cols) / 8;
    let blocks_per_row = padded_cols(cols) / BLOCK;
    let scales: Vec<f32> = matrix.scales.iter().map(|s| s.to_f32()).collect();
    let mut out = vec![0.0f32; tokens * rows];
    for t in 0..tokens {
        let x = &xs[t * cols..(t + 1) * cols];
        for r in 0..rows {
            let codes = &matrix.codes[r * words_per_row..(r + 1) * words_per_row];
            let mut acc = 0.0f32;
            for b in 0..blocks_per_row {
                let mut part = 0.0f32;
                for (w, &word) in codes[b * 4..b * 4 + 4].iter().enumerate() {
                    let base = b * BLOCK + w * 8;
                    for i in 0..8.min(cols.saturating_sub(base)) {
                        let q = ((word >> (4 * i)) & 0xF) as f32 - 8.0;
                        part += q * x[base + i];
                    }
                }
                acc += part * scales[r * blocks_per_row + b];
            }
            out[t * rows + r] = acc + bias[r];
        }
    }
    Tensor::from_data(TensorData::new(out, [tokens, rows]), &device)
}

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

    /// LayerNorm of each row of `x: [rows, cols]`, one workgroup per row: mean, then the
    /// (biased) variance of the differences, as transformers computes them. No shared memory
    /// or barriers, which cubecl 0.11.3 failed to verify here:
    /// - `plane` false: every thread computes the row's statistics itself (reads that hit the
    ///   cache);
    /// - `plane` true: each subgroup does, its lanes striding over the row and adding their
    ///   parts with `plane_sum` (a dependency chain of `cols / subgroup size` loads instead of
    ///   `cols`). Correct for any subgroup size; every lane of a workgroup reaches `plane_sum`.
    ///
    /// Then each thread writes its share of the row.
    #[cube(launch_unchecked)]
    pub fn layer_norm_kernel(
        x: &Tensor<f32>,
        weight: &[f32],
        bias: &[f32],
        out: &mut [f32],
        rows: usize,
        cols: usize,
        eps: f32,
        #[comptime] plane: bool,
    ) {
        let row = CUBE_POS;
        if row < rows {
            let base = row * x.stride(0);
            let step = x.stride(1);
            let count = f32::cast_from(cols);
            let mut lane = 0usize;
            let mut lanes = 1usize;
            if plane {
                lane = usize::cast_from(UNIT_POS_PLANE);
                lanes = usize::cast_from(PLANE_DIM);
            }
            let mut sum = f32::new(0.0);
            let mut col = lane;
            while col < cols {
                sum += x[base + col * step];
                col += lanes;
            }
            if plane {
                sum = plane_sum(sum);
            }
            let mean = sum / count;
            let mut squares = f32::new(0.0);
            col = lane;
            while col < cols {
                let d = x[base + col * step] - mean;
                squares += d * d;
                col += lanes;
            }
            if plane {
                squares = plane_sum(squares);
            }
            let scale = f32::new(1.0) / (squares / count + eps).sqrt();
            col = UNIT_POS as usize;
            while col < cols {
                out[row * cols + col] =
                    (x[base + col * step] - mean) * scale * weight[col] + bias[col];
                col += CUBE_DIM as usize;
            }
        }
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

    /// `output = input`, one word per thread (the benchmark's memory-copy bandwidth).
    #[cube(launch_unchecked)]
    pub fn copy_kernel(input: &[u32], output: &mut [u32], len: usize) {
        if ABSOLUTE_POS < len {
            output[ABSOLUTE_POS] = input[ABSOLUTE_POS];
        }
    }

    /// `chains` independent chains of `iterations` multiply-adds per thread, in registers:
    /// the adapter's f32 arithmetic ceiling, as the copy kernel is its memory one. With
    /// `params` = `[a, b, start]`, chain `j` of a thread runs `acc = acc · a + b` from
    /// `start + j + UNIT_POS % 8` towards `b / (1 - a)` (`|a| < 1`); `out` holds each thread's
    /// sum, so the work cannot be optimised away and can be checked.
    #[cube(launch_unchecked)]
    pub fn mul_add_kernel(
        params: &[f32],
        out: &mut [f32],
        iterations: u32,
        #[comptime] chains: usize,
    ) {
        let a = params[0];
        let b = params[1];
        let mut acc = Array::<f32>::new(chains);
        // Starts that differ between threads: identical work could run on a scalar unit.
        let lane = f32::cast_from(UNIT_POS % 8);
        #[unroll]
        for j in 0..chains {
            acc[j] = params[2] + lane + f32::cast_from(j as u32);
        }
        for _ in 0..iterations {
            #[unroll]
            for j in 0..chains {
                acc[j] = acc[j] * a + b;
            }
        }
        let mut total = f32::new(0.0);
        #[unroll]
        for j in 0..chains {
            total += acc[j];
        }
        if ABSOLUTE_POS < out.len() {
            out[ABSOLUTE_POS] = total;
        }
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

/// What follows `x·Wᵀ + b` in a matmul. On GPU backends it runs inside the matmul kernel (one
/// launch instead of the handful burn's element-wise ops take).
#[derive(Clone, Default)]
pub struct Epilogue {
    /// GELU (tanh approximation: transformers' `gelu_new`, Phi's MLP activation) on the first
    /// this many outputs of each token.
    pub gelu_outputs: usize,
    /// Added last: a residual connection, `[tokens, outputs]`.
    pub residual: Option<Tensor<2>>,
}

impl Epilogue {
    /// The same with burn's tensor ops.
    pub fn apply(self, y: Tensor<2>) -> Tensor<2> {
        let [_, outputs] = y.dims();
        let gelu = self.gelu_outputs.min(outputs);
        let y = if gelu == 0 {
            y
        } else {
            let activated =
                burn::tensor::activation::gelu_approximate(y.clone().narrow(1, 0, gelu));
            if gelu == outputs {
                activated
            } else {
                Tensor::cat(vec![activated, y.narrow(1, gelu, outputs - gelu)], 1)
            }
        };
        match self.residual {
            Some(residual) => y + residual,
            None => y,
        }
    }
}

/// How a GPU device runs the 4-bit matmul, from what its adapter offers. Every combination
/// computes the same function; the portable one (`{subgroups: false, f16: false}`) runs on any
/// WebGPU device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPlan {
    /// One subgroup per output value (coalesced reads, one `subgroupAdd`) instead of one
    /// thread per output value.
    pub subgroups: bool,
    /// Products of codes and activations in f16 (`shader-f16`); each word's sum joins the
    /// f32 accumulator.
    pub f16: bool,
    /// Matmul threads shaped for a software adapter ([`SOFTWARE_ROWS_PER_WORKER`]), as cubecl
    /// reports one: several output rows per thread instead of one.
    pub software: bool,
    /// With `software` and without `subgroups`, on an adapter whose subgroups have one known
    /// size: a subgroup's lanes share each word's activation loads ([`shared_load_lanes`]).
    /// There every load is a loop over the lanes and the 8 threads of a workgroup all read the
    /// same activations; each now loads one of them and the others come by `subgroupBroadcast`.
    /// A 10240 × 2560 matmul on lavapipe: 0.023-0.025 s a token instead of 0.031 s, and a
    /// 64-token prefill 1.5× as fast.
    pub shared_loads: bool,
}

/// See [`allow_f16`].
static F16: AtomicBool = AtomicBool::new(false);

/// See [`record_device_subgroups`].
static DEVICE_SUBGROUPS: AtomicBool = AtomicBool::new(false);

/// Records whether the wgpu device has the `subgroups` feature, as the code that made it saw:
/// natively [`crate::backend`] reads wgpu's device; in the browser the package, which asks for
/// the feature, says so (wgpu's WebGPU backend cannot see it). cubecl cannot tell on a software
/// adapter: it reports no subgroups for any CPU adapter, though lavapipe and SwiftShader have
/// them.
pub fn record_device_subgroups(subgroups: bool) {
    DEVICE_SUBGROUPS.store(subgroups, Ordering::Relaxed);
}

/// Lets weights uploaded from now on multiply in f16, and caches made from now on hold keys
/// and values in f16, where the adapter has shader-f16 (attention itself still computes in
/// f32). Off by default: f16 moves logits by up to ~1e-2 and can change greedy tokens (it did
/// on our random test model), and this project promises outputs that match the reference.
pub fn allow_f16(allow: bool) {
    F16.store(allow, Ordering::Relaxed);
}

/// Which kernels new weights and layers get ([`choose_kernels`]); the CLI's and the package's
/// `kernels` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum KernelChoice {
    /// What the adapter offers: subgroup kernels where cubecl reports subgroups, threads
    /// shaped for a software adapter on one, one output row per thread otherwise.
    #[default]
    Auto = 0,
    /// One output row per thread and no subgroups: core WebGPU only, the way around a driver
    /// whose subgroup operations misbehave (on a software adapter, whose `Auto` kernels now
    /// use subgroups too, at 4-5× the cost: it also drops the threads shaped for a CPU, so
    /// that the browser tests compile the kernel a GPU without subgroups runs).
    Portable = 1,
    /// One subgroup per output row, also on an adapter that calls itself software (cubecl
    /// reports no subgroups there, though SwiftShader has them). The device needs the
    /// `subgroups` feature ([`check_kernel_choice`]).
    Subgroups = 2,
}

impl std::str::FromStr for KernelChoice {
    type Err = crate::error::Error;

    fn from_str(name: &str) -> crate::error::Result<Self> {
        match name {
            "auto" => Ok(KernelChoice::Auto),
            "portable" => Ok(KernelChoice::Portable),
            "subgroups" => Ok(KernelChoice::Subgroups),
            other => Err(crate::error::Error::option(
                "kernels",
                format!("`{other}` is not one of auto, portable, subgroups"),
            )),
        }
    }
}

/// See [`choose_kernels`].
static KERNELS: AtomicU8 = AtomicU8::new(KernelChoice::Auto as u8);

/// Sets which kernels weights uploaded and models built from now on get (process-wide, like
/// [`allow_f16`]).
pub fn choose_kernels(choice: KernelChoice) {
    KERNELS.store(choice as u8, Ordering::Relaxed);
}

fn chosen_kernels() -> KernelChoice {
    match KERNELS.load(Ordering::Relaxed) {
        1 => KernelChoice::Portable,
        2 => KernelChoice::Subgroups,
        _ => KernelChoice::Auto,
    }
}

/// Fails when the kernels chosen ([`choose_kernels`]) need what `device` lacks
/// ([`record_device_subgroups`]): subgroup kernels on an adapter without the `subgroups`
/// feature would fail to compile at the first matmul, deep inside generation.
pub fn check_kernel_choice(device: &Device) -> crate::error::Result<()> {
    if chosen_kernels() == KernelChoice::Subgroups && !DEVICE_SUBGROUPS.load(Ordering::Relaxed) {
        let adapter = client_of(device).properties().identity.name.clone();
        return Err(crate::error::Error::option(
            "kernels",
            format!(
                "`subgroups` needs the adapter's subgroups feature, which this adapter \
                 (`{adapter}`) lacks: use auto or portable"
            ),
        ));
    }
    Ok(())
}

/// The element type of new KV caches on `device`: f16 where offered and allowed
/// ([`allow_f16`]), f32 otherwise (and always on the CPU backend).
pub fn kv_cache_dtype(device: &Device) -> DType {
    match KernelPlan::best(device) {
        Some(KernelPlan { f16: true, .. }) => DType::F16,
        _ => DType::F32,
    }
}

impl KernelPlan {
    pub const PORTABLE: KernelPlan = KernelPlan {
        subgroups: false,
        f16: false,
        software: false,
        shared_loads: false,
    };

    /// The plan new weights get on `device`: as [`choose_kernels`] says (by default what the
    /// adapter offers), f16 when offered and allowed ([`allow_f16`]). `None` on the CPU
    /// backend (no kernels).
    pub fn best(device: &Device) -> Option<KernelPlan> {
        KernelPlan::offered(device).map(|offered| {
            let f16 = offered.f16 && F16.load(Ordering::Relaxed);
            let shape = match chosen_kernels() {
                KernelChoice::Auto => offered,
                KernelChoice::Portable => KernelPlan::PORTABLE,
                KernelChoice::Subgroups => KernelPlan {
                    subgroups: true,
                    ..KernelPlan::PORTABLE
                },
            };
            KernelPlan { f16, ..shape }
        })
    }

    /// How its matmul work is shared out, in words.
    fn shape(&self) -> String {
        let worker = if self.subgroups { "subgroup" } else { "thread" };
        let shared = match self.shared_loads {
            true => ", activation loads shared across a subgroup",
            false => "",
        };
        match self.software {
            true => format!("a {worker} per {SOFTWARE_ROWS_PER_WORKER} output rows{shared}"),
            false => format!("a {worker} per output row"),
        }
    }

    /// Everything `device`'s adapter offers.
    fn offered(device: &Device) -> Option<KernelPlan> {
        (!is_cpu(device)).then(|| {
            let client = client_of(device);
            let props = client.properties().clone();
            // cubecl describes no physical device for a software adapter.
            let software = props.identity.physical.is_none();
            KernelPlan {
                subgroups: props.features.plane.contains(Plane::Ops),
                f16: props
                    .type_usage(ElemType::Float(FloatKind::F16))
                    .contains(TypeUsage::Arithmetic),
                software,
                shared_loads: software
                    && DEVICE_SUBGROUPS.load(Ordering::Relaxed)
                    && shared_load_lanes(&client).is_some(),
            }
        })
    }

    /// Every plan `device` can run (any device runs either thread shape).
    pub fn supported(device: &Device) -> Vec<KernelPlan> {
        let Some(best) = KernelPlan::offered(device) else {
            return Vec::new();
        };
        KernelPlan::all()
            .into_iter()
            .filter(|p| {
                (best.subgroups || !p.subgroups)
                    && (best.f16 || !p.f16)
                    && (best.shared_loads || !p.shared_loads)
            })
            .collect()
    }

    /// Every plan there is (shared loads only with the software shape, without subgroups).
    pub fn all() -> Vec<KernelPlan> {
        let mut plans = Vec::new();
        for subgroups in [false, true] {
            for f16 in [false, true] {
                for software in [false, true] {
                    for shared_loads in [false, true] {
                        if shared_loads && (subgroups || !software) {
                            continue;
                        }
                        plans.push(KernelPlan {
                            subgroups,
                            f16,
                            software,
                            shared_loads,
                        });
                    }
                }
            }
        }
        plans
    }
}

/// What the device is, for benchmark reports and the package's `info.device`: its adapter's
/// name, what it offers and which kernels new weights get.
pub fn describe_device(device: &Device) -> String {
    match (KernelPlan::offered(device), KernelPlan::best(device)) {
        (Some(offered), Some(used)) => {
            let props = client_of(device).properties().clone();
            // The adapter's feature: cubecl reports none for a software adapter that has them.
            let subgroups = offered.subgroups || DEVICE_SUBGROUPS.load(Ordering::Relaxed);
            format!(
                "{} (subgroups: {}, sizes {}-{}; shader-f16: {}; software adapter: {}; \
                 kernels: {}, f16 products and KV cache: {})",
                props.identity.name,
                subgroups,
                props.hardware.plane_size_min,
                props.hardware.plane_size_max,
                offered.f16,
                offered.software,
                used.shape(),
                used.f16,
            )
        }
        _ => "cpu (burn-flex)".to_string(),
    }
}

fn client_of(device: &Device) -> Client {
    cube(Tensor::<1>::zeros([1], device)).client
}

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

/// One layer's causal attention for `count` new tokens at positions `start..`, in two launches
/// (scores with the rotary embedding, then softmax and values) for what burn's ops do in about
/// forty. Row `t` of `inner: [count, stride]` holds token `t`'s queries, keys and values side by
/// side from column `q_at` (`[q | k | v]`, each `heads·head_dim` wide). The keys (rotated with
/// the `[positions, rot]` tables) and values are written into the layer's cache `keys`/`values:
/// [heads, capacity, head_dim]` at `start..`, and the attention output, heads merged, replaces
/// the queries in `inner`, which is returned. The cache may hold f32 or f16
/// ([`kv_cache_dtype`]).
pub fn attention(
    inner: Tensor<2>,
    q_at: usize,
    keys: &Tensor<3>,
    values: &Tensor<3>,
    rotary: [&Tensor<2>; 2],
    start: usize,
    scale: f32,
) -> Tensor<2> {
    let [count, stride] = inner.dims();
    let [heads, capacity, head_dim] = keys.dims();
    let rot = rotary[0].dims()[1];
    let inner = cube(inner);
    assert!(
        inner.meta.strides()[..] == [stride, 1],
        "attention: the activations must be contiguous"
    );
    let [cos, sin] = rotary.map(|t| cube(t.clone()));
    let (keys, values) = (cube(keys.clone()), cube(values.clone()));
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

/// LayerNorm over the last dimension of `x: [rows, cols]`: one launch for what burn's ops do
/// in about nine.
pub fn layer_norm(
    x: Tensor<2>,
    weight: &Tensor<1>,
    bias: &Tensor<1>,
    eps: f64,
    plan: KernelPlan,
) -> Tensor<2> {
    let [rows, cols] = x.dims();
    let x = cube(x);
    let (weight, bias) = (cube(weight.clone()), cube(bias.clone()));
    let client = x.client.clone();
    let out = empty_output(&x, [rows, cols], DType::F32);
    // A workgroup of at least one subgroup; on a software adapter one SIMD vector's worth
    // (every thread there repeats the statistics: 8 do it 8× cheaper than 64), whose
    // subgroups share the work where the matmul shares its loads.
    let threads = match (plan.subgroups, plan.software) {
        (true, _) => subgroup_workgroup(&client).0,
        (false, true) => SOFTWARE_WORKGROUP,
        (false, false) => WORKGROUP,
    };
    unsafe {
        shader::layer_norm_kernel::launch_unchecked(
            &client,
            grid(rows),
            CubeDim::new_1d(threads),
            x.into_tensor_arg(),
            buffer(&weight),
            buffer(&bias),
            buffer(&out),
            rows,
            cols,
            eps as f32,
            plan.subgroups || plan.shared_loads,
        );
    }
    Tensor::from_primitive::<Cube>(out)
}

/// How many lanes share a word's activation loads ([`KernelPlan::shared_loads`]): the
/// subgroup size, where the adapter reports one size (min = max) that divides the 8
/// activations of a word and fits in a software adapter's workgroup (so every subgroup is
/// whole). `None` otherwise. The kernel also takes a subgroup to be that many consecutive
/// invocations of the workgroup, aligned to the size: neither WebGPU nor Vulkan promises it,
/// but it is how both software adapters (llvmpipe, SwiftShader: one SIMD vector per
/// subgroup) form them, and the plan is only chosen on software adapters.
fn shared_load_lanes(client: &Client) -> Option<usize> {
    let hardware = &client.properties().hardware;
    let lanes = hardware.plane_size_min;
    (lanes == hardware.plane_size_max && lanes.is_power_of_two() && lanes <= SOFTWARE_WORKGROUP)
        .then_some(lanes as usize)
}

/// Threads in a workgroup that holds at least one whole subgroup of the largest size the
/// adapter reports, and that size.
fn subgroup_workgroup(client: &Client) -> (u32, u32) {
    let plane_max = client.properties().hardware.plane_size_max.max(1);
    (WORKGROUP.max(plane_max), plane_max)
}

/// `cubes` workgroups. Past WebGPU's per-dimension limit (65535) the grid wraps into a second
/// dimension; the kernels index by `ABSOLUTE_POS`/`CUBE_POS`, which count across dimensions,
/// and skip what lies past their end.
fn grid(cubes: usize) -> CubeCount {
    const ROW: usize = 32768;
    CubeCount::Static(cubes.min(ROW) as u32, cubes.div_ceil(ROW) as u32, 1)
}

/// A copy of `words` made by the plainest kernel: one read and one write per word.
pub fn copy_words(words: &Tensor<1, Int>) -> Tensor<1, Int> {
    let len = words.dims()[0];
    let input = cube(words.clone());
    let client = input.client.clone();
    let output = empty_output(&input, [len], DType::U32);
    unsafe {
        shader::copy_kernel::launch_unchecked(
            &client,
            grid(len.div_ceil(WORKGROUP as usize)),
            CubeDim::new_1d(WORKGROUP),
            buffer(&input),
            buffer(&output),
            len,
        );
    }
    Tensor::from_primitive::<Cube>(output)
}

/// `threads` × `iterations` × `chains` multiply-adds in registers
/// ([`shader::mul_add_kernel`]); each thread's output is `chains / 2` once `iterations` ≥ 64
/// (every chain, starting at most at 22.125, converges to 0.5).
pub fn multiply_adds(device: &Device, threads: usize, iterations: u32, chains: usize) -> Tensor<1> {
    let params = Tensor::<1>::from_data(TensorData::new(vec![0.5f32, 0.25, 0.125], [3]), device);
    let params = cube(params);
    let client = params.client.clone();
    let output = empty_output(&params, [threads], DType::F32);
    unsafe {
        shader::mul_add_kernel::launch_unchecked(
            &client,
            grid(threads.div_ceil(WORKGROUP as usize)),
            CubeDim::new_1d(WORKGROUP),
            buffer(&params),
            buffer(&output),
            iterations,
            chains,
        );
    }
    Tensor::from_primitive::<Cube>(output)
}

/// An uninitialised contiguous tensor of `shape` on `like`'s device, for a kernel to write.
fn empty_output<const D: usize>(like: &CubeTensor, shape: [usize; D], dtype: DType) -> CubeTensor {
    let bytes = shape.iter().product::<usize>() * dtype.size();
    let client = like.client.clone();
    let handle = client.empty(bytes);
    CubeTensor::new_contiguous(
        client,
        like.device.clone(),
        Shape::new(shape),
        handle,
        dtype,
    )
}

/// A contiguous tensor's elements as a kernel's buffer argument.
fn buffer(t: &CubeTensor) -> BufferArg {
    assert!(t.is_contiguous(), "kernel buffers are contiguous");
    let len = t.meta.shape().iter().product::<usize>();
    // Safety: a contiguous tensor's buffer holds at least its `len` elements.
    unsafe { BufferArg::from_raw_parts(t.handle.clone(), len) }
}

/// The cubecl tensor behind a tensor on a GPU device.
fn cube<const D: usize, K>(tensor: Tensor<D, K>) -> CubeTensor
where
    K: Basic + BackendPrimitive<Cube, Primitive = CubeTensor>,
{
    tensor
        .try_into_primitive::<Cube>()
        .expect("a tensor on a cubecl device")
}

#[allow(clippy::too_many_arguments)] // a weight's parts, the input and how to run it
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
