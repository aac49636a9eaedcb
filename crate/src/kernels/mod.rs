//! Our GPU kernels (cubecl: wgpu natively, WebGPU in the browser), one file per family, each
//! shader beside its launcher, and each with its CPU path (burn's CPU backend):
//! - [`q4`]: 4-bit matrix multiplication straight from the packed weights ([`crate::quant`]
//!   layout), with its bias, activation and residual ([`Epilogue`]); embedding rows of a 4-bit
//!   table. No float copy of a weight is made (unless a layer mixes 4-bit and f32 parts).
//! - [`attention`](mod@attention): causal attention with the rotary embedding and the KV-cache write inside.
//! - [`greedy`]: the greedy pick (largest logit, its id, the logits' sum).
//! - [`layer_norm`](mod@layer_norm): LayerNorm (inside the decode matmul where it fits).
//! - `reduce`: sums and maxima across a workgroup, through subgroups or workgroup memory.
//! - [`plan`]: which variant of each kernel a device runs ([`KernelPlan`]), from what its
//!   adapter offers and what the caller chose ([`KernelOptions`]).
//!
//! The benchmark's copy and multiply-add kernels live in [`crate::bench`].

pub mod attention;
pub mod greedy;
pub mod layer_norm;
pub mod plan;
pub mod q4;
#[cfg(feature = "gpu")]
mod reduce;

pub use attention::attention;
pub use greedy::greedy_candidates;
pub use layer_norm::{layer_norm, LayerNorm};
pub use plan::{describe_device, KernelChoice, KernelOptions, KernelPlan};
pub use q4::Q4Weight;

#[cfg(feature = "gpu")]
use burn::backend::wgpu::CubeTensor;
#[cfg(feature = "gpu")]
use burn::backend::Cube;
use burn::backend::DispatchDevice;
#[cfg(feature = "gpu")]
use burn::tensor::kind::Basic;
#[cfg(feature = "gpu")]
use burn::tensor::{BackendPrimitive, DType, Shape};
use burn::tensor::{Device, Tensor};
use cubecl::client::Client;
#[cfg(feature = "gpu")]
use cubecl::prelude::{BufferArg, CubeCount};

/// Threads per workgroup (at least one subgroup for the subgroup kernels).
#[cfg(feature = "gpu")]
pub(crate) const WORKGROUP: u32 = 64;

/// Threads per workgroup on a software adapter (a CPU emulating a GPU: llvmpipe,
/// SwiftShader): the widest SIMD vector they emulate with (llvmpipe's 8 f32 lanes on AVX2). A
/// software adapter shares workgroups out among its few CPU cores, and with 64-thread ones a
/// matmul's last workgroups left a core idle (BENCHMARKS.md).
const SOFTWARE_WORKGROUP: u32 = 8;

/// Whether `device` is burn's CPU backend, where no kernel runs.
pub fn is_cpu(device: &Device) -> bool {
    matches!(device.as_dispatch(), DispatchDevice::Flex(_))
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

/// The cubecl client of a GPU device; `None` on burn's CPU backend, the only backend of a
/// build without the `gpu` feature.
#[cfg_attr(not(feature = "gpu"), allow(unused_variables))]
pub(crate) fn client_of(device: &Device) -> Option<Client> {
    #[cfg(feature = "gpu")]
    if !is_cpu(device) {
        return Some(cube(Tensor::<1>::zeros([1], device)).client);
    }
    None
}

/// Threads in a workgroup that holds at least one whole subgroup of the largest size the
/// adapter reports, and that size.
#[cfg(feature = "gpu")]
fn subgroup_workgroup(client: &Client) -> (u32, u32) {
    let plane_max = client.properties().hardware.plane_size_max.max(1);
    (WORKGROUP.max(plane_max), plane_max)
}

/// `cubes` workgroups. Past WebGPU's per-dimension limit (65535) the grid wraps into a second
/// dimension; the kernels index by `ABSOLUTE_POS`/`CUBE_POS`, which count across dimensions,
/// and skip what lies past their end.
#[cfg(feature = "gpu")]
pub(crate) fn grid(cubes: usize) -> CubeCount {
    const ROW: usize = 32768;
    CubeCount::Static(cubes.min(ROW) as u32, cubes.div_ceil(ROW) as u32, 1)
}

/// An uninitialised contiguous tensor of `shape` on `like`'s device, for a kernel to write.
#[cfg(feature = "gpu")]
pub(crate) fn empty_output<const D: usize>(
    like: &CubeTensor,
    shape: [usize; D],
    dtype: DType,
) -> CubeTensor {
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
#[cfg(feature = "gpu")]
pub(crate) fn buffer(t: &CubeTensor) -> BufferArg {
    assert!(t.is_contiguous(), "kernel buffers are contiguous");
    let len = t.meta.shape().iter().product::<usize>();
    // Safety: a contiguous tensor's buffer holds at least its `len` elements.
    unsafe { BufferArg::from_raw_parts(t.handle.clone(), len) }
}

/// The cubecl tensor behind a tensor on a GPU device.
#[cfg(feature = "gpu")]
pub(crate) fn cube<const D: usize, K>(tensor: Tensor<D, K>) -> CubeTensor
where
    K: Basic + BackendPrimitive<Cube, Primitive = CubeTensor>,
{
    tensor
        .try_into_primitive::<Cube>()
        .expect("a tensor on a cubecl device")
}
