//! The 4-bit matrix multiplication (with its epilogue, and the LayerNorm before it where that
//! fits) and the row lookup of a 4-bit table, straight from the packed weights
//! ([`crate::quant`] layout): kernels on GPU backends, host loops on burn's CPU backend
//! ([`Q4Matrix::matmul`]). Which matmul kernel runs:
//! - [`gemv`]: a decoded token (or a prompt of up to [`GEMV_MAX_TOKENS`]) on a hardware
//!   GPU, a workgroup per few output rows, its threads along the columns;
//! - [`gemm`]: a longer prompt on a hardware GPU, tiles of tokens × rows in workgroup memory;
//! - `per_row`: everything on a software adapter (a CPU emulating a GPU), each thread (or
//!   subgroup) a group of output rows, shaped for the emulation.

use std::sync::Arc;

#[cfg(feature = "gpu")]
use burn::backend::wgpu::CubeTensor;
#[cfg(feature = "gpu")]
use burn::backend::Cube;
#[cfg(feature = "gpu")]
use burn::tensor::{DType, Int};
use burn::tensor::{Device, Tensor, TensorData};
#[cfg(feature = "gpu")]
use cubecl::prelude::{CubeDim, TensorArg};

use super::layer_norm::{normed, LayerNorm};
use super::plan::{KernelPlan, DECODE_ROWS_PER_WORKGROUP};
use super::Epilogue;
#[cfg(feature = "gpu")]
use super::{buffer, cube, empty_output, grid, is_cpu, WORKGROUP};
use crate::quant::Q4Matrix;

#[cfg(feature = "gpu")]
mod gemm;
#[cfg(feature = "gpu")]
mod gemv;
#[cfg(feature = "gpu")]
mod per_row;

/// Tokens the decode kernel takes at once: a prompt of up to this many runs it too, with a
/// column per token (each weight word then serves them all).
pub const GEMV_MAX_TOKENS: usize = 4;

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

    /// `norm(x) · Wᵀ + bias` for `x: [tokens, cols]` (`norm`: a LayerNorm first, or none),
    /// then `then`, giving `[tokens, rows]`: on a GPU the kernels `plan` names (which the device
    /// must support: see [`KernelPlan::supported`]), one launch where the LayerNorm fits in
    /// the matmul (see [`gemv`]), else two; on the CPU backend tensor ops and the host loop.
    pub fn matmul(
        &self,
        x: Tensor<2>,
        norm: Option<&LayerNorm>,
        bias: &Tensor<1>,
        then: Epilogue,
        plan: KernelPlan,
    ) -> Tensor<2> {
        self.matmul_with(x, norm, bias, then, plan, DECODE_ROWS_PER_WORKGROUP)
    }

    /// [`Q4Weight::matmul`] with `decode_rows` output rows per workgroup in the decode kernel
    /// of a GPU without the software shape (`phi2 bench --matmuls` compares them).
    #[cfg_attr(not(feature = "gpu"), allow(unused_variables))] // decode_rows: a GPU's
    pub fn matmul_with(
        &self,
        x: Tensor<2>,
        norm: Option<&LayerNorm>,
        bias: &Tensor<1>,
        then: Epilogue,
        plan: KernelPlan,
        decode_rows: usize,
    ) -> Tensor<2> {
        match self {
            #[cfg(feature = "gpu")]
            Q4Weight::Device {
                codes,
                scales,
                rows,
                cols,
            } => {
                let weight = DeviceWeight {
                    codes,
                    scales,
                    rows: *rows,
                    cols: *cols,
                };
                gpu_matmul(x, norm, &weight, bias, then, plan, decode_rows)
            }
            Q4Weight::Host(matrix) => then.apply(cpu_matmul(normed(x, norm, plan), matrix, bias)),
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
/// A 4-bit weight on a GPU device: its packed parts and shape.
#[cfg(feature = "gpu")]
struct DeviceWeight<'a> {
    codes: &'a Tensor<1, Int>,
    scales: &'a Tensor<1, Int>,
    rows: usize,
    cols: usize,
}

/// What every matmul kernel takes: `x: [tokens, cols]` (unit column stride), the weight's
/// codes and scale words, the bias, the epilogue's residual and GELU width, and the output
/// `[tokens, rows]` to write.
#[cfg(feature = "gpu")]
struct Operands {
    x: CubeTensor,
    codes: CubeTensor,
    scales: CubeTensor,
    bias: CubeTensor,
    residual: Option<CubeTensor>,
    out: CubeTensor,
    rows: usize,
    cols: usize,
    tokens: usize,
    gelu_outputs: usize,
}

#[cfg(feature = "gpu")]
impl Operands {
    fn new(x: Tensor<2>, weight: &DeviceWeight, bias: &Tensor<1>, then: Epilogue) -> Self {
        let [tokens, cols] = x.dims();
        debug_assert_eq!(cols, weight.cols);
        let x = cube(x);
        assert_eq!(x.meta.strides()[1], 1, "matmul: x needs unit column stride");
        let out = empty_output(&x, [tokens, weight.rows], DType::F32);
        Operands {
            codes: cube(weight.codes.clone()),
            scales: cube(weight.scales.clone()),
            bias: cube(bias.clone()),
            residual: then.residual.map(cube),
            out,
            x,
            rows: weight.rows,
            cols,
            tokens,
            gelu_outputs: then.gelu_outputs,
        }
    }

    /// The residual binding: without a residual the kernels never read it, and `x` stands in.
    fn residual_arg(&self) -> TensorArg {
        self.residual
            .as_ref()
            .unwrap_or(&self.x)
            .clone()
            .into_tensor_arg()
    }
}

/// [`Q4Weight::matmul_with`] on a GPU: picks the kernel (see the module's description).
#[cfg(feature = "gpu")]
fn gpu_matmul(
    x: Tensor<2>,
    norm: Option<&LayerNorm>,
    weight: &DeviceWeight,
    bias: &Tensor<1>,
    then: Epilogue,
    plan: KernelPlan,
    decode_rows: usize,
) -> Tensor<2> {
    let [tokens, cols] = x.dims();
    let client = cube(bias.clone()).client;
    let decode = !plan.software && tokens <= GEMV_MAX_TOKENS;
    let shape = gemv::GemvShape::new(&client, decode_rows);
    let fused_norm = norm.filter(|_| decode && gemv::fits_layer_norm(&client, shape, tokens, cols));
    let x = normed(x, norm.filter(|_| fused_norm.is_none()), plan);
    let operands = Operands::new(x, weight, bias, then);
    if decode {
        gemv::launch(&operands, fused_norm, plan, shape);
    } else if plan.software {
        per_row::launch(&operands, plan);
    } else {
        gemm::launch(&operands, plan);
    }
    Tensor::from_primitive::<Cube>(operands.out)
}

#[cfg(feature = "gpu")]
pub(crate) mod shader {
    use cubecl::prelude::*;

    /// The scale of block `block` of row `row` of a matrix `cols` wide: two f16 scales per
    /// word, each row starting on a word of its own ([`crate::quant::Q4Matrix::row_scale_words`]).
    #[cube]
    pub(crate) fn block_scale(scales: &[u32], row: usize, block: usize, cols: usize) -> f32 {
        scale_in_word(scales[row * cols.div_ceil(64) + block / 2], block % 2 == 1)
    }

    /// The f16 scale in the low (or `high`) half of a scale word, as f32, without `shader-f16`
    /// and without shifts (see [`super::per_row`]'s `scaled`): masks pick the half's bits where they are,
    /// and a multiplication through f32 (exact: 15 significant bits) moves sign, exponent and
    /// mantissa to their f32 places. Zero and subnormals (never produced by the quantizer except
    /// zero) read as 0.
    #[cube]
    pub(crate) fn scale_in_word(word: u32, high: bool) -> f32 {
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
    pub(crate) fn code_value(packed: u32, i: usize) -> f32 {
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

    /// GELU, tanh approximation, as transformers' `gelu_new`. The tanh argument is clamped to
    /// ±15, where f32 tanh is already ±1: some shader compilers' tanh overflows to NaN beyond.
    #[cube]
    fn gelu_tanh(x: f32) -> f32 {
        let inner = f32::new(0.797_884_6) * (x + f32::new(0.044715) * x * x * x);
        let t = inner.clamp(f32::new(-15.0), f32::new(15.0)).tanh();
        f32::new(0.5) * x * (f32::new(1.0) + t)
    }

    /// Writes output `at` (< rows) of token `token` (< tokens): `acc` plus the bias, GELU
    /// below `gelu_rows`, then the residual (when `add_residual`).
    #[cube]
    #[allow(clippy::too_many_arguments)] // one output and what follows the matmul
    pub(crate) fn write_output(
        acc: f32,
        bias: &[f32],
        residual: &Tensor<f32>,
        out: &mut [f32],
        at: usize,
        token: usize,
        rows: usize,
        gelu_rows: usize,
        #[comptime] add_residual: bool,
    ) {
        let mut y = acc + bias[at];
        if at < gelu_rows {
            y = gelu_tanh(y);
        }
        if add_residual {
            y += residual[token * residual.stride(0) + at * residual.stride(1)];
        }
        out[token * rows + at] = y;
    }
}
