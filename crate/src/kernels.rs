//! Our GPU kernels (cubecl: wgpu natively, WebGPU in the browser) and their CPU counterparts.
//! - 4-bit matrix multiplication straight from the packed weights ([`crate::quant`] layout),
//!   with its bias and activation: a kernel on GPU backends, a plain loop on burn's CPU
//!   backend. No float copy of a weight is ever made.
//! - Embedding rows of a 4-bit table.
//! - The decode path's fused steps: LayerNorm, split into heads with the rotary embedding, and
//!   causal attention (burn's CPU backend composes these from tensor ops in [`crate::model`]).
//! - The plain copy behind the benchmark's bandwidth figure.

use std::sync::atomic::{AtomicBool, Ordering};
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
        let scales = words(matrix.scale_words());
        Q4Weight::Device {
            plan: KernelPlan::best(device).unwrap_or(KernelPlan::PORTABLE),
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

    /// `then(x · Wᵀ + bias)` for `x: [tokens, cols]`, giving `[tokens, rows]`, with the
    /// device's best kernels.
    pub fn matmul(&self, x: Tensor<2>, bias: &Tensor<1>, then: Activation) -> Tensor<2> {
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
        then: Activation,
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

    /// `out[h, t, d] = x[t, h·head_dim + d]`, rotated on the first `rot` dims of each head the
    /// rotate-half way for position `start + t` (`rot` = 0: split into heads only). One thread
    /// per output value.
    #[cube(launch_unchecked)]
    pub fn heads_rotary_kernel(
        x: &Tensor<f32>,
        cos: &[f32],
        sin: &[f32],
        out: &mut [f32],
        count: usize,
        heads: usize,
        head_dim: usize,
        rot: usize,
        start: usize,
    ) {
        let index = ABSOLUTE_POS;
        if index < heads * count * head_dim {
            let d = index % head_dim;
            let t = (index / head_dim) % count;
            let h = index / (head_dim * count);
            let row = t * x.stride(0);
            let col = x.stride(1);
            let at = h * head_dim;
            let mut value = x[row + (at + d) * col];
            if d < rot {
                let half = rot / 2;
                // rotate_half: the partner of d is d + half (negated) or d - half.
                let partner = x[row + (at + (d + half) % rot) * col];
                let sign = select(d < half, f32::new(-1.0), f32::new(1.0));
                let table = (start + t) * rot + d;
                value = value * cos[table] + sign * partner * sin[table];
            }
            out[index] = value;
        }
    }

    /// LayerNorm of each row of `x: [rows, cols]`, one workgroup per row: mean, then the
    /// (biased) variance of the differences, as transformers computes them. Every thread
    /// computes the row's statistics itself (reads that hit the cache) and writes its share
    /// of the row: no shared memory or barriers, which cubecl 0.11.3 failed to verify here.
    #[cube(launch_unchecked)]
    pub fn layer_norm_kernel(
        x: &Tensor<f32>,
        weight: &[f32],
        bias: &[f32],
        out: &mut [f32],
        rows: usize,
        cols: usize,
        eps: f32,
    ) {
        let row = CUBE_POS;
        if row < rows {
            let base = row * x.stride(0);
            let step = x.stride(1);
            let count = f32::cast_from(cols);
            let mut sum = f32::new(0.0);
            for col in 0..cols {
                sum += x[base + col * step];
            }
            let mean = sum / count;
            let mut squares = f32::new(0.0);
            for col in 0..cols {
                let d = x[base + col * step] - mean;
                squares += d * d;
            }
            let scale = f32::new(1.0) / (squares / count + eps).sqrt();
            let mut col = UNIT_POS as usize;
            while col < cols {
                out[row * cols + col] =
                    (x[base + col * step] - mean) * scale * weight[col] + bias[col];
                col += CUBE_DIM as usize;
            }
        }
    }

    /// `scores[h, t, j] = scale · q[h, t, :] · keys[h, j, :]` for the positions token `t` may
    /// attend (`j ≤ start + t`); the others are never read. One thread per score.
    #[cube(launch_unchecked)]
    pub fn attention_scores_kernel(
        q: &Tensor<f32>,
        keys: &Tensor<f32>,
        scores: &mut [f32],
        heads: usize,
        count: usize,
        total: usize,
        start: usize,
        scale: f32,
    ) {
        let index = ABSOLUTE_POS;
        if index < heads * count * total {
            let j = index % total;
            let t = (index / total) % count;
            let h = index / (total * count);
            if j <= start + t {
                let head_dim = q.shape(2);
                let q_at = h * q.stride(0) + t * q.stride(1);
                let k_at = h * keys.stride(0) + j * keys.stride(1);
                let mut dot = f32::new(0.0);
                for d in 0..head_dim {
                    dot += q[q_at + d * q.stride(2)] * keys[k_at + d * keys.stride(2)];
                }
                scores[index] = dot * scale;
            }
        }
    }

    /// Each row of `scores: [heads·count, total]` becomes the softmax over the positions its
    /// token may attend, in place. One thread per row.
    #[cube(launch_unchecked)]
    pub fn attention_softmax_kernel(
        scores: &mut [f32],
        rows: usize,
        count: usize,
        total: usize,
        start: usize,
    ) {
        let row = ABSOLUTE_POS;
        if row < rows {
            let end = start + row % count + 1;
            let at = row * total;
            let mut max = scores[at];
            for j in 1..end {
                max = max.max(scores[at + j]);
            }
            let mut sum = f32::new(0.0);
            for j in 0..end {
                let e = (scores[at + j] - max).exp();
                scores[at + j] = e;
                sum += e;
            }
            for j in 0..end {
                scores[at + j] /= sum;
            }
        }
    }

    /// `out[t, h·head_dim + d] = Σ_j probs[h, t, j] · values[h, j, d]` over the positions token
    /// `t` attends: the heads merged back, ready for the output projection. One thread per value.
    #[cube(launch_unchecked)]
    pub fn attention_values_kernel(
        probs: &[f32],
        values: &Tensor<f32>,
        out: &mut [f32],
        heads: usize,
        count: usize,
        total: usize,
        start: usize,
    ) {
        let index = ABSOLUTE_POS;
        let head_dim = values.shape(2);
        if index < count * heads * head_dim {
            let d = index % head_dim;
            let h = (index / head_dim) % heads;
            let t = index / (head_dim * heads);
            let at = (h * count + t) * total;
            let v_at = h * values.stride(0) + d * values.stride(2);
            let mut acc = f32::new(0.0);
            for j in 0..start + t + 1 {
                acc += probs[at + j] * values[v_at + j * values.stride(1)];
            }
            out[index] = acc;
        }
    }

    /// `output = input`, one word per thread (the benchmark's memory-copy bandwidth).
    #[cube(launch_unchecked)]
    pub fn copy_kernel(input: &[u32], output: &mut [u32], len: usize) {
        if ABSOLUTE_POS < len {
            output[ABSOLUTE_POS] = input[ABSOLUTE_POS];
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
            let block = row * (words_per_row / 4) + col / 32;
            out[index] = code_value(packed, col % 8) * block_scale(scales, block);
        }
    }

    /// `Σ code·x` over the 8 codes of one packed word (those inside the row), the products
    /// and their sum in `F` (f32, or f16 where the adapter has `shader-f16`).
    #[cube]
    fn word_dot<F: Float>(
        x: &Tensor<f32>,
        x_row: usize,
        packed: u32,
        word: usize,
        cols: usize,
    ) -> f32 {
        let x_col = x.stride(1);
        let base = word * 8;
        let mut part = F::new(0.0);
        #[unroll]
        for i in 0..8usize {
            let col = base + i;
            if col < cols {
                part += F::cast_from(code_value(packed, i)) * F::cast_from(x[x_row + col * x_col]);
            }
        }
        f32::cast_from(part)
    }

    /// GELU, tanh approximation, as transformers' `gelu_new`. The tanh argument is clamped to
    /// ±15, where f32 tanh is already ±1: some shader compilers' tanh overflows to NaN beyond.
    #[cube]
    fn gelu_tanh(x: f32) -> f32 {
        let inner = f32::new(0.797_884_6) * (x + f32::new(0.044715) * x * x * x);
        let t = inner.clamp(f32::new(-15.0), f32::new(15.0)).tanh();
        f32::new(0.5) * x * (f32::new(1.0) + t)
    }

    /// The value written for an output: bias added, then the activation.
    #[cube]
    fn finish(acc: f32, bias: f32, #[comptime] gelu: bool) -> f32 {
        let y = acc + bias;
        if gelu {
            gelu_tanh(y)
        } else {
            y
        }
    }

    /// One thread per output value, looping over its weight row word by word. Needs nothing
    /// beyond core WebGPU.
    #[cube(launch_unchecked)]
    pub fn q4_matmul_kernel<F: Float>(
        x: &Tensor<f32>,
        codes: &[u32],
        scales: &[u32],
        bias: &[f32],
        out: &mut [f32],
        cols: usize,
        rows: usize,
        tokens: usize,
        #[comptime] gelu: bool,
    ) {
        let index = ABSOLUTE_POS;
        if index < rows * tokens {
            let token = index / rows;
            let row = index % rows;
            let words_per_row = cols.div_ceil(32) * 4;
            let mut acc = f32::new(0.0);
            let mut word = 0usize;
            while word < words_per_row {
                let packed = codes[row * words_per_row + word];
                let block = row * (words_per_row / 4) + word / 4;
                acc += word_dot::<F>(x, token * x.stride(0), packed, word, cols)
                    * block_scale(scales, block);
                word += 1;
            }
            out[index] = finish(acc, bias[row], gelu);
        }
    }

    /// One subgroup (plane) per output value: its lanes stride over the row's words, so
    /// neighbouring lanes read neighbouring words, and `plane_sum` adds their parts. Correct for
    /// any subgroup size: the plane's position and stride come from `PLANE_DIM` at run time.
    /// `plane_sum` is reached by every invocation (WGSL requires uniform control flow there):
    /// planes past the end run an empty loop and write nothing.
    #[cube(launch_unchecked)]
    pub fn q4_matmul_plane_kernel<F: Float>(
        x: &Tensor<f32>,
        codes: &[u32],
        scales: &[u32],
        bias: &[f32],
        out: &mut [f32],
        cols: usize,
        rows: usize,
        tokens: usize,
        #[comptime] gelu: bool,
    ) {
        let planes_per_cube = usize::cast_from(CUBE_DIM / PLANE_DIM);
        let plane = CUBE_POS * planes_per_cube + usize::cast_from(UNIT_POS / PLANE_DIM);
        let valid = plane < rows * tokens;
        let index = select(valid, plane, 0usize);
        let token = index / rows;
        let row = index % rows;
        let words_per_row = cols.div_ceil(32) * 4;
        let end = select(valid, words_per_row, 0usize);
        let mut acc = f32::new(0.0);
        let mut word = usize::cast_from(UNIT_POS_PLANE);
        while word < end {
            let packed = codes[row * words_per_row + word];
            let block = row * (words_per_row / 4) + word / 4;
            acc += word_dot::<F>(x, token * x.stride(0), packed, word, cols)
                * block_scale(scales, block);
            word += usize::cast_from(PLANE_DIM);
        }
        let total = plane_sum(acc);
        if valid && UNIT_POS_PLANE == 0 {
            out[index] = finish(total, bias[row], gelu);
        }
    }
}

/// What follows a matmul. On GPU backends it runs inside the matmul kernel (one launch instead
/// of the handful burn's element-wise ops take).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    /// GELU, tanh approximation (transformers' `gelu_new`, Phi's MLP activation).
    GeluTanh,
}

impl Activation {
    /// The same with burn's tensor ops.
    pub fn apply(self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Activation::None => x,
            Activation::GeluTanh => burn::tensor::activation::gelu_approximate(x),
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
}

/// See [`allow_f16_products`].
static F16_PRODUCTS: AtomicBool = AtomicBool::new(false);

/// Lets weights uploaded from now on multiply in f16 where the adapter has shader-f16. Off by
/// default: f16 products move logits by up to ~1e-2 and can change greedy tokens (they did on
/// our random test model), and this project promises outputs that match the reference.
pub fn allow_f16_products(allow: bool) {
    F16_PRODUCTS.store(allow, Ordering::Relaxed);
}

impl KernelPlan {
    pub const PORTABLE: KernelPlan = KernelPlan {
        subgroups: false,
        f16: false,
    };

    /// The plan new weights get on `device`: subgroups when offered, f16 when offered and
    /// allowed ([`allow_f16_products`]). `None` on the CPU backend (no kernels).
    pub fn best(device: &Device) -> Option<KernelPlan> {
        KernelPlan::offered(device).map(|plan| KernelPlan {
            f16: plan.f16 && F16_PRODUCTS.load(Ordering::Relaxed),
            ..plan
        })
    }

    /// Everything `device`'s adapter offers.
    fn offered(device: &Device) -> Option<KernelPlan> {
        (!is_cpu(device)).then(|| {
            let props = client_of(device).properties().clone();
            KernelPlan {
                subgroups: props.features.plane.contains(Plane::Ops),
                f16: props
                    .type_usage(ElemType::Float(FloatKind::F16))
                    .contains(TypeUsage::Arithmetic),
            }
        })
    }

    /// Every plan `device` can run.
    pub fn supported(device: &Device) -> Vec<KernelPlan> {
        let Some(best) = KernelPlan::offered(device) else {
            return Vec::new();
        };
        [false, true]
            .into_iter()
            .flat_map(|subgroups| {
                [false, true]
                    .into_iter()
                    .map(move |f16| KernelPlan { subgroups, f16 })
            })
            .filter(|p| (best.subgroups || !p.subgroups) && (best.f16 || !p.f16))
            .collect()
    }
}

/// What the device is, for benchmark reports: its adapter's name, what it offers and which
/// kernels new weights get.
pub fn describe_device(device: &Device) -> String {
    match (KernelPlan::offered(device), KernelPlan::best(device)) {
        (Some(offered), Some(used)) => {
            let props = client_of(device).properties().clone();
            format!(
                "{} (subgroups: {}, sizes {}-{}; shader-f16: {}; f16 products: {})",
                props.identity.name,
                offered.subgroups,
                props.hardware.plane_size_min,
                props.hardware.plane_size_max,
                offered.f16,
                used.f16
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
            grid((tokens * cols).div_ceil(WORKGROUP as usize)),
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

/// `x: [count, heads·head_dim]` (a projection's output) as `[heads, count, head_dim]`, its first
/// `rot` dims per head rotated for positions `start..` with the `[positions, rot]` tables: one
/// launch for what burn's ops do in about twenty (narrow, neg, cat, mul, add, swap).
#[allow(clippy::too_many_arguments)] // the shape of one attention projection
pub fn heads_rotary(
    x: Tensor<2>,
    cos: &Tensor<2>,
    sin: &Tensor<2>,
    heads: usize,
    rot: usize,
    start: usize,
) -> Tensor<3> {
    let [count, hidden] = x.dims();
    let head_dim = hidden / heads;
    let x = cube(x);
    let (cos, sin) = (cube(cos.clone()), cube(sin.clone()));
    let client = x.client.clone();
    let len = count * hidden;
    let out = CubeTensor::new_contiguous(
        client.clone(),
        x.device.clone(),
        Shape::new([heads, count, head_dim]),
        client.empty(len * 4),
        DType::F32,
    );
    let table_len = cos.meta.shape().iter().product::<usize>();
    unsafe {
        shader::heads_rotary_kernel::launch_unchecked(
            &client,
            grid(len.div_ceil(WORKGROUP as usize)),
            CubeDim::new_1d(WORKGROUP),
            x.into_tensor_arg(),
            BufferArg::from_raw_parts(cos.handle.clone(), table_len),
            BufferArg::from_raw_parts(sin.handle.clone(), table_len),
            BufferArg::from_raw_parts(out.handle.clone(), len),
            count,
            heads,
            head_dim,
            rot,
            start,
        );
    }
    Tensor::from_primitive::<Cube>(out)
}

/// Causal attention of `q: [heads, count, head_dim]` (positions `start..start + count`) over
/// `keys`/`values: [heads, total, head_dim]` (any strides: views of the KV cache), scaled by
/// `scale`, giving `[count, heads·head_dim]`: three launches (scores, softmax, weighted sum)
/// for what burn's ops do in about twelve (matmuls, scale, mask, softmax, merging the heads).
pub fn attention(
    q: Tensor<3>,
    keys: Tensor<3>,
    values: Tensor<3>,
    start: usize,
    scale: f32,
) -> Tensor<2> {
    let [heads, count, head_dim] = q.dims();
    let total = keys.dims()[1];
    let (q, keys, values) = (cube(q), cube(keys), cube(values));
    let client = q.client.clone();
    let device = q.device.clone();
    let scores_len = heads * count * total;
    let scores = client.empty(scores_len * 4);
    let out_len = count * heads * head_dim;
    let out = CubeTensor::new_contiguous(
        client.clone(),
        device,
        Shape::new([count, heads * head_dim]),
        client.empty(out_len * 4),
        DType::F32,
    );
    let dim = CubeDim::new_1d(WORKGROUP);
    let cubes = |n: usize| grid(n.div_ceil(WORKGROUP as usize));
    unsafe {
        shader::attention_scores_kernel::launch_unchecked(
            &client,
            cubes(scores_len),
            dim,
            q.into_tensor_arg(),
            keys.into_tensor_arg(),
            BufferArg::from_raw_parts(scores.clone(), scores_len),
            heads,
            count,
            total,
            start,
            scale,
        );
        shader::attention_softmax_kernel::launch_unchecked(
            &client,
            cubes(heads * count),
            dim,
            BufferArg::from_raw_parts(scores.clone(), scores_len),
            heads * count,
            count,
            total,
            start,
        );
        shader::attention_values_kernel::launch_unchecked(
            &client,
            cubes(out_len),
            dim,
            BufferArg::from_raw_parts(scores, scores_len),
            values.into_tensor_arg(),
            BufferArg::from_raw_parts(out.handle.clone(), out_len),
            heads,
            count,
            total,
            start,
        );
    }
    Tensor::from_primitive::<Cube>(out)
}

/// LayerNorm over the last dimension of `x: [rows, cols]`: one launch for what burn's ops do
/// in about nine.
pub fn layer_norm(x: Tensor<2>, weight: &Tensor<1>, bias: &Tensor<1>, eps: f64) -> Tensor<2> {
    const THREADS: u32 = 64;
    let [rows, cols] = x.dims();
    let x = cube(x);
    let (weight, bias) = (cube(weight.clone()), cube(bias.clone()));
    let client = x.client.clone();
    let out = CubeTensor::new_contiguous(
        client.clone(),
        x.device.clone(),
        Shape::new([rows, cols]),
        client.empty(rows * cols * 4),
        DType::F32,
    );
    unsafe {
        shader::layer_norm_kernel::launch_unchecked(
            &client,
            grid(rows),
            CubeDim::new_1d(THREADS),
            x.into_tensor_arg(),
            BufferArg::from_raw_parts(weight.handle.clone(), cols),
            BufferArg::from_raw_parts(bias.handle.clone(), cols),
            BufferArg::from_raw_parts(out.handle.clone(), rows * cols),
            rows,
            cols,
            eps as f32,
        );
    }
    Tensor::from_primitive::<Cube>(out)
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
    let output = CubeTensor::new_contiguous(
        client.clone(),
        input.device.clone(),
        Shape::new([len]),
        client.empty(len * 4),
        DType::U32,
    );
    unsafe {
        shader::copy_kernel::launch_unchecked(
            &client,
            grid(len.div_ceil(WORKGROUP as usize)),
            CubeDim::new_1d(WORKGROUP),
            BufferArg::from_raw_parts(input.handle.clone(), len),
            BufferArg::from_raw_parts(output.handle.clone(), len),
            len,
        );
    }
    Tensor::from_primitive::<Cube>(output)
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
    then: Activation,
    plan: KernelPlan,
) -> Tensor<2> {
    let [tokens, _] = x.dims();
    debug_assert_eq!(x.dims()[1], cols);
    let x = cube(x);
    let (codes, scales, bias) = (
        cube(codes.clone()),
        cube(scales.clone()),
        cube(bias.clone()),
    );
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
    let outputs = rows * tokens;
    let (count, dim) = if plan.subgroups {
        // Enough planes for every output even with the largest subgroup the adapter reports.
        let plane_max = client.properties().hardware.plane_size_max.max(1);
        let threads = WORKGROUP.max(plane_max);
        let planes = (threads / plane_max) as usize;
        (outputs.div_ceil(planes), threads)
    } else {
        (outputs.div_ceil(WORKGROUP as usize), WORKGROUP)
    };
    let count = grid(count);
    let dim = CubeDim::new_1d(dim);
    macro_rules! launch {
        ($kernel:ident, $float:ty) => {
            unsafe {
                shader::$kernel::launch_unchecked::<$float>(
                    &client,
                    count,
                    dim,
                    x.into_tensor_arg(),
                    BufferArg::from_raw_parts(codes.handle.clone(), code_len),
                    BufferArg::from_raw_parts(scales.handle.clone(), scale_len),
                    BufferArg::from_raw_parts(bias.handle.clone(), bias_len),
                    BufferArg::from_raw_parts(out.handle.clone(), outputs),
                    cols,
                    rows,
                    tokens,
                    then == Activation::GeluTanh,
                )
            }
        };
    }
    match (plan.subgroups, plan.f16) {
        (false, false) => launch!(q4_matmul_kernel, f32),
        (false, true) => launch!(q4_matmul_kernel, half::f16),
        (true, false) => launch!(q4_matmul_plane_kernel, f32),
        (true, true) => launch!(q4_matmul_plane_kernel, half::f16),
    }
    Tensor::from_primitive::<Cube>(out)
}
