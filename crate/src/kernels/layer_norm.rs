//! LayerNorm over the last dimension: one kernel launch on GPU backends (for what burn's ops
//! do in about nine), tensor ops on burn's CPU backend.

#[cfg(feature = "gpu")]
use burn::backend::Cube;
#[cfg(feature = "gpu")]
use burn::tensor::DType;
use burn::tensor::Tensor;
#[cfg(feature = "gpu")]
use cubecl::prelude::CubeDim;

use super::KernelPlan;
#[cfg(feature = "gpu")]
use super::{
    buffer, cube, empty_output, grid, is_cpu, subgroup_workgroup, SOFTWARE_WORKGROUP, WORKGROUP,
};

/// A LayerNorm's parameters (transformers' `nn.LayerNorm`). The 4-bit matmul can run it inside
/// its kernel ([`super::Q4Weight::matmul`]).
pub struct LayerNorm {
    pub weight: Tensor<1>,
    pub bias: Tensor<1>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: Tensor<2>, plan: KernelPlan) -> Tensor<2> {
        layer_norm(x, &self.weight, &self.bias, self.eps, plan)
    }
}

/// `x` after `norm` where there is one.
pub fn normed(x: Tensor<2>, norm: Option<&LayerNorm>, plan: KernelPlan) -> Tensor<2> {
    match norm {
        Some(norm) => norm.forward(x, plan),
        None => x,
    }
}

/// LayerNorm of each row of `x: [rows, cols]`, as transformers computes it (the biased
/// variance), with the kernels of `plan` on a GPU.
#[cfg_attr(not(feature = "gpu"), allow(unused_variables))] // plan: the kernels'
pub fn layer_norm(
    x: Tensor<2>,
    weight: &Tensor<1>,
    bias: &Tensor<1>,
    eps: f64,
    plan: KernelPlan,
) -> Tensor<2> {
    #[cfg(feature = "gpu")]
    if !is_cpu(&x.device()) {
        return gpu_layer_norm(x, weight, bias, eps, plan);
    }
    let (var, mean) = x.clone().var_mean_bias(1);
    let normed = (x - mean) / (var + eps).sqrt();
    normed * weight.clone().unsqueeze::<2>() + bias.clone().unsqueeze::<2>()
}

/// [`layer_norm`]'s kernel.
#[cfg(feature = "gpu")]
fn gpu_layer_norm(
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

#[cfg(feature = "gpu")]
mod shader {
    use cubecl::prelude::*;

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
}
