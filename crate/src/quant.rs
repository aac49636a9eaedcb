//! 4-bit block quantization, the layout the GPU kernels read.
//!
//! A matrix `[rows, cols]` (checkpoint layout: one row per output feature) is cut into blocks of
//! 32 consecutive values along each row; a row is padded with zeros to a whole number of blocks.
//! Each block has one f16 scale `d`; a value is `d * (q - 8)` with `q` a 4-bit code — the same
//! formula as ggml's Q4_0, so Q4_0 files carry over losslessly. Codes are packed eight to a
//! little-endian u32, value `j` of a row in bits `4 * (j % 8)` of word `j / 8`. Scales are f16
//! stored two to a u32 (low half first) so shaders without `shader-f16` can unpack them.
//! Storage: 4 bits + 16/32 bits = 4.5 bits per weight.

use half::f16;

pub const BLOCK: usize = 32;

/// Rows one task of the threaded CPU matmul computes: enough to outweigh scheduling, few
/// enough to share a 2560-row matrix among many cores.
#[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
const ROWS_PER_TASK: usize = 64;

/// A block of 32 activations in the order its codes come out of their 4 words: entry `[i][j]`
/// is the value under nibble `i` of word `j` (position `8j + i`), so that one shift and mask
/// of the 4 words gives 4 codes at once, which compilers turn into one SIMD operation.
type NibbleBlock = [[f32; 4]; 8];

/// `x: [tokens, cols]` as [`NibbleBlock`]s, `blocks` per token, padded with zeros.
fn nibble_ordered(x: &[f32], tokens: usize, cols: usize, blocks: usize) -> Vec<NibbleBlock> {
    let mut out = vec![[[0.0f32; 4]; 8]; tokens * blocks];
    for (t, token) in out.chunks_exact_mut(blocks).enumerate() {
        for (b, block) in token.iter_mut().enumerate() {
            for (i, lanes) in block.iter_mut().enumerate() {
                for (j, value) in lanes.iter_mut().enumerate() {
                    let col = b * BLOCK + 8 * j + i;
                    if col < cols {
                        *value = x[t * cols + col];
                    }
                }
            }
        }
    }
    out
}

/// `halves` as f32 into `out`, exactly as `f16::to_f32`, but branch-free so that it compiles to
/// SIMD: a decode converts a row's scales for each token, and `half`'s per-value conversion
/// (what its slice conversion does without x86's F16C) took about as long as the products in
/// wasm (BENCHMARKS.md).
fn scales_to_f32(halves: &[f16], out: &mut [f32]) {
    // 2^112: moves an f16 exponent (bias 15) placed in an f32 (bias 127); subnormals too.
    const REBIAS: f32 = f32::from_bits(0x7780_0000);
    for (out, half) in out.iter_mut().zip(halves) {
        let bits = u32::from(half.to_bits());
        let magnitude = f32::from_bits((bits & 0x7fff) << 13) * REBIAS;
        // Infinity and NaN (all exponent bits set) keep their payload.
        let special = f32::from_bits(0x7f80_0000 | (bits & 0x03ff) << 13);
        let magnitude = if bits & 0x7c00 == 0x7c00 {
            special
        } else {
            magnitude
        };
        *out = if bits & 0x8000 != 0 {
            -magnitude
        } else {
            magnitude
        };
    }
}

/// Tokens a pass takes together: each block's codes are unpacked once for all of them.
const TOKENS_AT_ONCE: usize = 4;

/// Rows a pass takes together when it has [`TOKENS_AT_ONCE`] tokens: each block's activations
/// are loaded once for all of them. With fewer tokens (a decode) one row at a time is faster
/// (two rows of one token compiled to slower SIMD), and natively (SSE's 16 registers) also
/// with 4 (BENCHMARKS.md).
#[cfg(target_arch = "wasm32")]
const ROWS_AT_ONCE: usize = 2;
#[cfg(not(target_arch = "wasm32"))]
const ROWS_AT_ONCE: usize = 1;

/// The sums of one block's products for `R` rows and `N` tokens: each row's 4 code words
/// against each token's activations. Written for compilers to vectorize; wasm has its own,
/// the same arithmetic in simd128 intrinsics.
#[cfg(not(target_arch = "wasm32"))]
#[inline(always)]
fn block_dots<const R: usize, const N: usize>(
    words: [&[u32]; R],
    x: [&NibbleBlock; N],
) -> [[f32; N]; R] {
    let words = words.map(|w| [w[0], w[1], w[2], w[3]]);
    let mut acc = [[[0.0f32; 4]; N]; R];
    for i in 0..8 {
        let codes = words.map(|w| w.map(|word| (((word >> (4 * i)) & 0xF) as i32 - 8) as f32));
        for (acc, codes) in acc.iter_mut().zip(&codes) {
            for (acc, x) in acc.iter_mut().zip(&x) {
                for j in 0..4 {
                    acc[j] += codes[j] * x[i][j];
                }
            }
        }
    }
    acc.map(|row| row.map(|lanes| (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])))
}

/// [`block_dots`] in simd128 intrinsics: the form above, vectorized by the compiler, ran 2.3×
/// slower in the package's build (one codegen unit) than in a small crate (BENCHMARKS.md).
/// The same operations in the same order, so the same results.
#[cfg(target_arch = "wasm32")]
#[inline(always)]
fn block_dots<const R: usize, const N: usize>(
    words: [&[u32]; R],
    x: [&NibbleBlock; N],
) -> [[f32; N]; R] {
    use core::arch::wasm32::*;
    let words = words.map(|w| u32x4(w[0], w[1], w[2], w[3]));
    let mut acc = [[f32x4_splat(0.0); N]; R];
    for i in 0..8 {
        let codes = words.map(|w| {
            let nibbles = v128_and(u32x4_shr(w, 4 * i as u32), u32x4_splat(0xF));
            f32x4_convert_i32x4(i32x4_sub(nibbles, i32x4_splat(8)))
        });
        for (acc, codes) in acc.iter_mut().zip(&codes) {
            for (acc, x) in acc.iter_mut().zip(&x) {
                let [a, b, c, d] = x[i];
                *acc = f32x4_add(*acc, f32x4_mul(*codes, f32x4(a, b, c, d)));
            }
        }
    }
    acc.map(|row| {
        row.map(|lanes| {
            (f32x4_extract_lane::<0>(lanes) + f32x4_extract_lane::<1>(lanes))
                + (f32x4_extract_lane::<2>(lanes) + f32x4_extract_lane::<3>(lanes))
        })
    })
}

/// `R` rows' products for `N` tokens into `out` (a row's `N` outputs each), from the rows'
/// code words and scales as f32, and the tokens' activations (`x`, [`nibble_ordered`] from the
/// first of them).
fn row_block<const R: usize, const N: usize>(
    codes: [&[u32]; R],
    scales: [&[f32]; R],
    x: &[NibbleBlock],
    out: [&mut [f32]; R],
) {
    let blocks = scales[0].len();
    let mut acc = [[0.0f32; N]; R];
    for b in 0..blocks {
        let words = codes.map(|codes| &codes[b * 4..b * 4 + 4]);
        let sums = block_dots::<R, N>(words, std::array::from_fn(|t| &x[t * blocks + b]));
        for k in 0..R {
            for t in 0..N {
                acc[k][t] += sums[k][t] * scales[k][b];
            }
        }
    }
    for (out, acc) in out.into_iter().zip(acc) {
        out.copy_from_slice(&acc);
    }
}

/// A 4-bit matrix in GPU layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Q4Matrix {
    pub rows: usize,
    pub cols: usize,
    /// `rows * padded_cols / 8` words.
    pub codes: Vec<u32>,
    /// `rows * padded_cols / 32` scales.
    pub scales: Vec<f16>,
}

pub fn padded_cols(cols: usize) -> usize {
    cols.div_ceil(BLOCK) * BLOCK
}

/// Where a part placed into a bigger matrix may start along a row: a block boundary, so that
/// its blocks stay whole.
pub const PLACEMENT_COLS: usize = BLOCK;

/// Panics unless a `part_rows × part_cols` part fits at `(row, col)` of a `rows × cols`
/// matrix on a placement boundary (the model computes these offsets; a miss is a bug).
fn check_placement(
    part_rows: usize,
    part_cols: usize,
    row: usize,
    col: usize,
    rows: usize,
    cols: usize,
) {
    assert!(
        col.is_multiple_of(PLACEMENT_COLS) && row + part_rows <= rows && col + part_cols <= cols,
        "a {part_rows}x{part_cols} part does not fit at ({row}, {col}) of {rows}x{cols}"
    );
}

fn pack_halves(scales: &[f16]) -> Vec<u32> {
    scales
        .chunks(2)
        .map(|pair| {
            let low = pair[0].to_bits() as u32;
            let high = pair.get(1).map_or(0, |h| h.to_bits() as u32);
            low | (high << 16)
        })
        .collect()
}

impl Q4Matrix {
    pub fn blocks_per_row(&self) -> usize {
        padded_cols(self.cols) / BLOCK
    }

    /// Quantizes a row-major `[rows, cols]` matrix: per block, the value of largest magnitude
    /// maps to code 0 (`d = max / -8`), as ggml does.
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(
            values.len(),
            rows * cols,
            "quantize: {rows}x{cols} needs {} values",
            rows * cols
        );
        let padded = padded_cols(cols);
        let mut codes = vec![0u32; rows * padded / 8];
        let mut scales = Vec::with_capacity(rows * padded / BLOCK);
        let mut block = [0.0f32; BLOCK];
        for r in 0..rows {
            let row = &values[r * cols..(r + 1) * cols];
            for b in 0..padded / BLOCK {
                block.fill(0.0);
                let start = b * BLOCK;
                let end = (start + BLOCK).min(cols);
                block[..end - start].copy_from_slice(&row[start..end]);
                let max = block
                    .iter()
                    .copied()
                    .fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                // ggml's rule exactly (the inverse from the unrounded scale), so a checkpoint
                // converted here and a Q4_0 GGUF made from the same weights agree bit for bit.
                let d = max / -8.0;
                scales.push(f16::from_f32(d));
                let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                for (j, &v) in block.iter().enumerate() {
                    let q = ((v * inv + 8.5) as i32).clamp(0, 15) as u32;
                    let index = r * padded + start + j;
                    codes[index / 8] |= q << (4 * (index % 8));
                }
            }
        }
        Q4Matrix {
            rows,
            cols,
            codes,
            scales,
        }
    }

    /// Rows `start..start + count` (rows are independent in this layout).
    pub fn rows_range(&self, start: usize, count: usize) -> Q4Matrix {
        let words = padded_cols(self.cols) / 8;
        let blocks = self.blocks_per_row();
        Q4Matrix {
            rows: count,
            cols: self.cols,
            codes: self.codes[start * words..(start + count) * words].to_vec(),
            scales: self.scales[start * blocks..(start + count) * blocks].to_vec(),
        }
    }

    /// The 4-bit code of element `(row, col)`.
    pub fn code(&self, row: usize, col: usize) -> u32 {
        let index = row * padded_cols(self.cols) + col;
        (self.codes[index / 8] >> (4 * (index % 8))) & 0xF
    }

    pub fn scale(&self, row: usize, col: usize) -> f32 {
        self.scales[row * self.blocks_per_row() + col / BLOCK].to_f32()
    }

    pub fn value(&self, row: usize, col: usize) -> f32 {
        self.scale(row, col) * (self.code(row, col) as f32 - 8.0)
    }

    /// Dequantizes one row (the embedding lookup needs single rows only).
    pub fn dequantize_row(&self, row: usize) -> Vec<f32> {
        (0..self.cols).map(|c| self.value(row, c)).collect()
    }

    /// Row-major `[rows, cols]` values; for tests and reference computations.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows)
            .flat_map(|r| self.dequantize_row(r))
            .collect()
    }

    /// Scales as u32 words, two f16 each (low half first), padded with a zero half: the
    /// bundle file's layout.
    pub fn scale_words(&self) -> Vec<u32> {
        pack_halves(&self.scales)
    }

    /// Scales as the kernels read them: two f16 per u32 word like [`Self::scale_words`], but
    /// each row starting on a word of its own, as the kernels index them.
    pub fn row_scale_words(&self) -> Vec<u32> {
        self.scales
            .chunks(self.blocks_per_row().max(1))
            .flat_map(pack_halves)
            .collect()
    }

    /// A `rows × cols` matrix holding `parts` at `(row, col)` each and zeros elsewhere (zero
    /// scales, so any code there is worth 0). A part's `col` must be a multiple of
    /// [`PLACEMENT_COLS`], so that its blocks stay whole.
    pub fn assemble(rows: usize, cols: usize, parts: &[(&Q4Matrix, usize, usize)]) -> Q4Matrix {
        let words = padded_cols(cols) / 8;
        let blocks = padded_cols(cols) / BLOCK;
        let mut codes = vec![0u32; rows * words];
        let mut scales = vec![f16::ZERO; rows * blocks];
        for &(part, row, col) in parts {
            check_placement(part.rows, part.cols, row, col, rows, cols);
            let (part_words, part_blocks) = (part.blocks_per_row() * 4, part.blocks_per_row());
            for r in 0..part.rows {
                let to = (row + r) * words + col / 8;
                codes[to..to + part_words]
                    .copy_from_slice(&part.codes[r * part_words..(r + 1) * part_words]);
                let to = (row + r) * blocks + col / BLOCK;
                scales[to..to + part_blocks]
                    .copy_from_slice(&part.scales[r * part_blocks..(r + 1) * part_blocks]);
            }
        }
        Q4Matrix {
            rows,
            cols,
            codes,
            scales,
        }
    }

    /// `x · Wᵀ` for `x: [tokens, cols]` (row-major), giving `[tokens, rows]`: the CPU
    /// backend's 4-bit matmul. Each block's products are summed before its scale multiplies
    /// them, as the GPU kernels do. The rows are shared among rayon's threads natively and in
    /// the `threads` wasm build.
    pub fn matmul(&self, x: &[f32], tokens: usize) -> Vec<f32> {
        let blocks = self.blocks_per_row();
        let x = nibble_ordered(x, tokens, self.cols, blocks);
        let mut by_row = vec![0.0f32; self.rows * tokens];
        let rows_of = |first: usize, out: &mut [f32]| {
            let mut scales = vec![0.0f32; ROWS_AT_ONCE * blocks];
            for (i, out) in out.chunks_mut(ROWS_AT_ONCE * tokens).enumerate() {
                self.rows_products(first + i * ROWS_AT_ONCE, tokens, &x, &mut scales, out);
            }
        };
        #[cfg(any(not(target_arch = "wasm32"), feature = "threads"))]
        {
            use rayon::prelude::*;
            let rows_per_task = ROWS_PER_TASK.min(self.rows.max(1));
            by_row
                .par_chunks_mut(rows_per_task * tokens)
                .enumerate()
                .for_each(|(task, out)| rows_of(task * rows_per_task, out));
        }
        #[cfg(all(target_arch = "wasm32", not(feature = "threads")))]
        rows_of(0, &mut by_row);
        // [rows, tokens] → [tokens, rows].
        let mut out = vec![0.0f32; tokens * self.rows];
        for (r, row) in by_row.chunks_exact(tokens).enumerate() {
            for (t, &y) in row.iter().enumerate() {
                out[t * self.rows + r] = y;
            }
        }
        out
    }

    /// Rows `first..` of the product, one or [`ROWS_AT_ONCE`] (`out.len() / tokens`), for the
    /// `tokens` tokens of `x` (from [`nibble_ordered`]) into `out` (`[rows, tokens]`); `scales`
    /// is room for the rows' scales as f32.
    fn rows_products(
        &self,
        first: usize,
        tokens: usize,
        x: &[NibbleBlock],
        scales: &mut [f32],
        out: &mut [f32],
    ) {
        let blocks = self.blocks_per_row();
        let rows = out.len() / tokens;
        let scales = &mut scales[..rows * blocks];
        scales_to_f32(
            &self.scales[first * blocks..(first + rows) * blocks],
            scales,
        );
        let (scales, codes) = (&*scales, &self.codes[first * blocks * 4..]);
        let codes_of = |k: usize| &codes[k * blocks * 4..(k + 1) * blocks * 4];
        let scales_of = |k: usize| &scales[k * blocks..(k + 1) * blocks];
        for first_token in (0..tokens).step_by(TOKENS_AT_ONCE) {
            let n = (tokens - first_token).min(TOKENS_AT_ONCE);
            let x = &x[first_token * blocks..];
            if rows == ROWS_AT_ONCE && n == TOKENS_AT_ONCE {
                let mut rows_out = out.chunks_exact_mut(tokens);
                let out = std::array::from_fn(|_| match rows_out.next() {
                    Some(row) => &mut row[first_token..first_token + n],
                    None => unreachable!("`rows` rows of outputs"),
                });
                let (codes, scales) = (
                    std::array::from_fn(codes_of),
                    std::array::from_fn(scales_of),
                );
                row_block::<ROWS_AT_ONCE, TOKENS_AT_ONCE>(codes, scales, x, out);
                continue;
            }
            for (k, out) in out.chunks_exact_mut(tokens).enumerate() {
                let (codes, scales) = ([codes_of(k)], [scales_of(k)]);
                let out = [&mut out[first_token..first_token + n]];
                match n {
                    1 => row_block::<1, 1>(codes, scales, x, out),
                    2 => row_block::<1, 2>(codes, scales, x, out),
                    3 => row_block::<1, 3>(codes, scales, x, out),
                    _ => row_block::<1, TOKENS_AT_ONCE>(codes, scales, x, out),
                }
            }
        }
    }

    /// `y = x · Wᵀ` for `x: [n, cols]` on the CPU, accumulating per block like the kernels.
    pub fn matmul_reference(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; n * self.rows];
        for i in 0..n {
            let xi = &x[i * self.cols..(i + 1) * self.cols];
            for r in 0..self.rows {
                y[i * self.rows + r] = (0..self.cols).map(|c| xi[c] * self.value(r, c)).sum();
            }
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(747796405).wrapping_add(2891336453);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn round_trip_error_is_at_most_half_a_step() {
        for (rows, cols) in [(3, 32), (5, 70), (17, 96), (1, 1)] {
            let values = pseudo_random(rows * cols, (rows * cols) as u32);
            let q = Q4Matrix::quantize(&values, rows, cols);
            assert_eq!(q.codes.len(), rows * padded_cols(cols) / 8);
            assert_eq!(q.scales.len(), rows * padded_cols(cols) / BLOCK);
            for r in 0..rows {
                for c in 0..cols {
                    let step = q.scale(r, c).abs();
                    let err = (values[r * cols + c] - q.value(r, c)).abs();
                    // Half a step, plus the f16 rounding of the scale over at most 8 steps. The
                    // range is -8..7 steps (ggml's), so a value opposite the block's largest one
                    // and as large is clamped to code 15: up to one step there.
                    let steps = if q.code(r, c) == 15 { 1.0 } else { 0.5 };
                    let bound = step * steps + step * 8.0 * 1e-3 + 1e-7;
                    assert!(err <= bound, "({r},{c}): {err} vs step {step}");
                }
            }
        }
    }

    #[test]
    fn scales_convert_as_half_converts_them() {
        let halves: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut converted = vec![0.0f32; halves.len()];
        scales_to_f32(&halves, &mut converted);
        for (half, got) in halves.iter().zip(converted) {
            let expected = half.to_f32();
            assert!(
                got.to_bits() == expected.to_bits() || (got.is_nan() && expected.is_nan()),
                "{:#06x}: {got} instead of {expected}",
                half.to_bits()
            );
        }
    }

    #[test]
    fn largest_magnitude_is_exact_and_padding_is_zero() {
        let mut values = vec![0.25f32; 40];
        values[3] = -2.0;
        let q = Q4Matrix::quantize(&values, 1, 40);
        assert_eq!(q.value(0, 3), -2.0);
        assert_eq!(q.code(0, 3), 0);
        // the padded tail of the second block holds code 8, i.e. zero
        assert_eq!(q.codes[q.codes.len() - 1] >> 28, 8);
        let all_zero = Q4Matrix::quantize(&[0.0; 32], 1, 32);
        assert!(all_zero.dequantize().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn row_scale_words_start_each_row_on_a_word() {
        // 70 columns: 3 blocks per row, so each row's last word has an empty high half.
        let q = Q4Matrix::quantize(&pseudo_random(2 * 70, 4), 2, 70);
        let words = q.row_scale_words();
        assert_eq!(words.len(), 4);
        let half = |i: usize| q.scales[i].to_bits() as u32;
        assert_eq!(
            words,
            [
                half(0) | half(1) << 16,
                half(2),
                half(3) | half(4) << 16,
                half(5)
            ]
        );
    }

    #[test]
    fn scale_words_pack_two_halves() {
        let q = Q4Matrix::quantize(&pseudo_random(3 * 32, 9), 3, 32);
        let words = q.scale_words();
        assert_eq!(words.len(), 2);
        assert_eq!(words[0] & 0xFFFF, q.scales[0].to_bits() as u32);
        assert_eq!(words[0] >> 16, q.scales[1].to_bits() as u32);
        assert_eq!(words[1] >> 16, 0);
    }
}
