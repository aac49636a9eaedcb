//! 4-bit matrix multiplication straight from the packed weights ([`crate::quant`] layout):
//! a cubecl kernel on GPU backends (wgpu natively, WebGPU in the browser), a plain loop on
//! burn's CPU backend. No float copy of a weight is ever made.

use std::sync::Arc;

use burn::backend::wgpu::CubeTensor;
use burn::backend::{Cube, DispatchDevice};
use burn::tensor::{DType, Device, Int, Shape, Tensor, TensorData};
use cubecl::prelude::{BufferArg, CubeCount, CubeDim};

use crate::quant::{padded_cols, Q4Matrix, BLOCK};

/// Threads per workgroup. No subgroup operations: browsers' WebGPU device may lack them.
const WORKGROUP: u32 = 64;

/// A 4-bit weight `[rows = out features, cols = in features]` where the model runs.
#[allow(clippy::large_enum_variant)] // a few per model, not worth a box
pub enum Q4Weight {
    /// Codes and f16-pair scale words as u32 tensors on a GPU device.
    Device {
        codes: Tensor<1, Int>,
        scales: Tensor<1, Int>,
        rows: usize,
        cols: usize,
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
        let scales = words(matrix.scale_words());
        Q4Weight::Device {
            rows: matrix.rows,
            cols: matrix.cols,
            codes: words(matrix.codes),
            scales,
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            Q4Weight::Device { rows, .. } => *rows,
            Q4Weight::Host(m) => m.rows,
        }
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

    /// `x · Wᵀ + bias` for `x: [tokens, cols]`, giving `[tokens, rows]`.
    pub fn matmul(&self, x: Tensor<2>, bias: &Tensor<1>) -> Tensor<2> {
        match self {
            Q4Weight::Device {
                codes,
                scales,
                rows,
                cols,
            } => gpu_matmul(x, codes, scales, bias, *rows, *cols),
            Q4Weight::Host(matrix) => cpu_matmul(x, matrix, bias),
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

    /// f16 bits (in the low 16 bits of a u32) to f32, with integer operations only: the shader
    /// needs no `shader-f16`. Zero and subnormals (never produced by the quantizer except zero)
    /// map to 0.
    #[cube]
    fn half_to_f32(bits: u32) -> f32 {
        let sign = (bits >> 15) << 31;
        let exponent = (bits >> 10) & 31u32;
        let mantissa = bits & 1023u32;
        let normal = sign | ((exponent + 112u32) << 23) | (mantissa << 13);
        f32::reinterpret(select(exponent != 0u32, normal, sign))
    }

    /// The scale of block `block` (two f16 scales per word).
    #[cube]
    fn block_scale(scales: &[u32], block: usize) -> f32 {
        half_to_f32((scales[block / 2] >> u32::cast_from((block % 2) * 16)) & 65535u32)
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
            let block = row * (words_per_row / 4) + col / 32;
            out[index] = code_value(packed, col % 8) * block_scale(scales, block);
        }
    }

    /// One thread per output value, looping over its weight row block by block. (A
    /// workgroup-per-output version with a shared-memory reduction failed cubecl's IR
    /// verification in 0.11.3; speed work belongs to the benchmark issue.)
    #[cube(launch_unchecked)]
    pub fn q4_matmul_kernel(
        x: &Tensor<f32>,
        codes: &[u32],
        scales: &[u32],
        bias: &[f32],
        out: &mut [f32],
        cols: usize,
        rows: usize,
        tokens: usize,
    ) {
        let index = ABSOLUTE_POS;
        if index < rows * tokens {
            let token = index / rows;
            let row = index % rows;
            let x_row = token * x.stride(0);
            let x_col = x.stride(1);
            let words_per_row = cols.div_ceil(32) * 4;
            let mut acc = f32::new(0.0);
            let mut word = 0usize;
            while word < words_per_row {
                let packed = codes[row * words_per_row + word];
                let block = row * (words_per_row / 4) + word / 4;
                let base = word * 8;
                let mut part = f32::new(0.0);
                #[unroll]
                for i in 0..8usize {
                    let col = base + i;
                    if col < cols {
                        part += code_value(packed, i) * x[x_row + col * x_col];
                    }
                }
                acc += part * block_scale(scales, block);
                word += 1;
            }
            out[index] = acc + bias[row];
        }
    }
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
    let [ids, codes, scales] = [&ids, codes, scales].map(|t| {
        t.clone()
            .try_into_primitive::<Cube>()
            .expect("a tensor on a cubecl device")
    });
    let client = codes.client.clone();
    let out = CubeTensor::new_contiguous(
        client.clone(),
        codes.device.clone(),
        Shape::new([tokens, cols]),
        client.empty(tokens * cols * 4),
        DType::F32,
    );
    let len = |t: &CubeTensor| t.meta.shape().iter().product::<usize>();
    unsafe {
        shader::q4_rows_kernel::launch_unchecked(
            &client,
            CubeCount::Static((tokens * cols).div_ceil(WORKGROUP as usize) as u32, 1, 1),
            CubeDim::new_1d(WORKGROUP),
            BufferArg::from_raw_parts(ids.handle.clone(), tokens),
            BufferArg::from_raw_parts(codes.handle.clone(), len(&codes)),
            BufferArg::from_raw_parts(scales.handle.clone(), len(&scales)),
            BufferArg::from_raw_parts(out.handle.clone(), tokens * cols),
            cols,
            tokens,
        );
    }
    Tensor::from_primitive::<Cube>(out)
}

fn cube(tensor: Tensor<2>) -> CubeTensor {
    tensor
        .try_into_primitive::<Cube>()
        .expect("a GPU tensor on a cubecl device")
}

fn gpu_matmul(
    x: Tensor<2>,
    codes: &Tensor<1, Int>,
    scales: &Tensor<1, Int>,
    bias: &Tensor<1>,
    rows: usize,
    cols: usize,
) -> Tensor<2> {
    let [tokens, _] = x.dims();
    debug_assert_eq!(x.dims()[1], cols);
    let x = cube(x);
    let as_cube = |t: &Tensor<1, Int>| {
        t.clone()
            .try_into_primitive::<Cube>()
            .expect("weights on the same cubecl device")
    };
    let (codes, scales) = (as_cube(codes), as_cube(scales));
    let bias = bias
        .clone()
        .try_into_primitive::<Cube>()
        .expect("bias on the same cubecl device");
    let client = x.client.clone();
    let handle = client.empty(tokens * rows * 4);
    let out = CubeTensor::new_contiguous(
        client.clone(),
        x.device.clone(),
        Shape::new([tokens, rows]),
        handle,
        DType::F32,
    );
    let len = |t: &CubeTensor| t.meta.shape().iter().product::<usize>();
    let (code_len, scale_len, bias_len) = (len(&codes), len(&scales), len(&bias));
    unsafe {
        shader::q4_matmul_kernel::launch_unchecked(
            &client,
            CubeCount::Static((rows * tokens).div_ceil(WORKGROUP as usize) as u32, 1, 1),
            CubeDim::new_1d(WORKGROUP),
            x.into_tensor_arg(),
            BufferArg::from_raw_parts(codes.handle.clone(), code_len),
            BufferArg::from_raw_parts(scales.handle.clone(), scale_len),
            BufferArg::from_raw_parts(bias.handle.clone(), bias_len),
            BufferArg::from_raw_parts(out.handle.clone(), tokens * rows),
            cols,
            rows,
            tokens,
        );
    }
    Tensor::from_primitive::<Cube>(out)
}
