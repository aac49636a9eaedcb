//! Which variant of each kernel a device runs: what its adapter offers, narrowed by what the
//! caller chose ([`KernelOptions`]). A model keeps its plan ([`crate::Phi::kernel_plan`]), so
//! two models on one device can run different kernels.

use burn::tensor::{DType, Device};
use cubecl::client::Client;
use cubecl::features::{Plane, TypeUsage};
use cubecl::ir::{ElemType, FloatKind};

use super::{client_of, SOFTWARE_WORKGROUP};
use crate::backend::adapter_subgroups;
use crate::error::{Error, Result};

/// Output rows a matmul thread handles on a software adapter (a CPU emulating a GPU: llvmpipe,
/// SwiftShader). There every buffer load is a loop over the SIMD lanes (llvmpipe inserts each
/// lane's value through the stack), so loads, not arithmetic, set the speed: a thread that
/// reads each activation once for 16 rows is several times faster there (BENCHMARKS.md). A
/// GPU's kernels share out each row's columns among a workgroup's threads instead.
pub(crate) const SOFTWARE_ROWS_PER_WORKER: usize = 16;

/// Output rows per workgroup of the decode matmul on a hardware GPU, unless chosen otherwise:
/// each activation load serves them all (`phi2 bench --matmuls` compares 2, 4 and 8;
/// BENCHMARKS.md).
pub(crate) const DECODE_ROWS_PER_WORKGROUP: usize = 8;

/// Tokens, and output rows, of a workgroup's tile in the prefill matmul on a hardware GPU.
pub(crate) const PREFILL_TILE: usize = 64;

/// Which kernels a model gets: the CLI's `--kernels`, the package's `kernels` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelChoice {
    /// What the adapter offers: threads shaped for a software adapter on one; on a GPU its
    /// kernels (workgroups along the columns to decode, tiles to prefill) with their sums
    /// through subgroups where cubecl reports them, else in workgroup memory.
    #[default]
    Auto,
    /// A GPU's kernels without subgroups: core WebGPU only, the way around a driver whose
    /// subgroup operations misbehave (on a software adapter, whose `Auto` kernels use
    /// subgroups too, it also drops the threads shaped for a CPU, so that the browser tests
    /// compile the kernels a GPU without subgroups runs).
    Portable,
    /// A GPU's kernels with their sums through subgroups, also on an adapter that calls
    /// itself software (cubecl reports no subgroups there, though SwiftShader has them). The
    /// adapter needs the `subgroups` feature.
    Subgroups,
}

impl std::str::FromStr for KernelChoice {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "auto" => Ok(KernelChoice::Auto),
            "portable" => Ok(KernelChoice::Portable),
            "subgroups" => Ok(KernelChoice::Subgroups),
            other => Err(Error::option(
                "kernels",
                format!("`{other}` is not one of auto, portable, subgroups"),
            )),
        }
    }
}

/// What the caller chose for a model's kernels; it goes with the load to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelOptions {
    pub kernels: KernelChoice,
    /// The 4-bit matmul's products and the KV cache in f16 where the adapter has shader-f16
    /// (attention itself still computes in f32). Off by default: f16 moves logits by up to
    /// ~1e-2 and can change greedy tokens (it did on our random test model), and this project
    /// promises outputs that match the reference.
    pub f16: bool,
}

/// How a GPU device runs the 4-bit matmul and its neighbours. Every combination computes the
/// same function; the portable one (all false) runs on any WebGPU device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPlan {
    /// Matmul threads reduce their parts through subgroups (`subgroupAdd`) instead of
    /// workgroup memory; with `software`, a subgroup per group of output rows instead of a
    /// thread.
    pub subgroups: bool,
    /// Products of codes and activations in f16 (`shader-f16`); each word's sum joins the
    /// f32 accumulator. The KV cache is f16 too.
    pub f16: bool,
    /// Matmul threads shaped for a software adapter (`SOFTWARE_ROWS_PER_WORKER`), as cubecl
    /// reports one: several output rows per thread, instead of a hardware GPU's workgroups
    /// along the columns (decode) and tiles in workgroup memory (prefill).
    pub software: bool,
    /// With `software` and without `subgroups`, on an adapter whose subgroups have one known
    /// size: a subgroup's lanes share each word's activation loads (`shared_load_lanes`).
    /// There every load is a loop over the lanes and the 8 threads of a workgroup all read the
    /// same activations; each now loads one of them and the others come by `subgroupBroadcast`.
    pub shared_loads: bool,
}

impl KernelPlan {
    pub const PORTABLE: KernelPlan = KernelPlan {
        subgroups: false,
        f16: false,
        software: false,
        shared_loads: false,
    };

    /// The plan a model loaded with `options` gets on `device`: by default what the adapter
    /// offers, f16 where offered and asked for. [`KernelPlan::PORTABLE`] on the CPU backend,
    /// where no kernel runs. Fails when the choice needs what the adapter lacks: subgroup
    /// kernels there would fail to compile at the first matmul, deep inside generation.
    pub fn for_device(device: &Device, options: KernelOptions) -> Result<KernelPlan> {
        let Some(client) = client_of(device) else {
            return Ok(KernelPlan::PORTABLE);
        };
        let offered = KernelPlan::offered_by(device, &client);
        let shape = match options.kernels {
            KernelChoice::Auto => offered,
            KernelChoice::Portable => KernelPlan::PORTABLE,
            KernelChoice::Subgroups if !adapter_subgroups(device) => {
                let adapter = client.properties().identity.name.clone();
                return Err(Error::option(
                    "kernels",
                    format!(
                        "`subgroups` needs the adapter's subgroups feature, which this adapter \
                         (`{adapter}`) lacks: use auto or portable"
                    ),
                ));
            }
            KernelChoice::Subgroups => KernelPlan {
                subgroups: true,
                ..KernelPlan::PORTABLE
            },
        };
        Ok(KernelPlan {
            f16: offered.f16 && options.f16,
            ..shape
        })
    }

    /// The element type of the KV caches of a model with this plan.
    pub fn kv_cache_dtype(&self) -> DType {
        match self.f16 {
            true => DType::F16,
            false => DType::F32,
        }
    }

    /// How its matmul work is shared out, in words.
    fn shape(&self) -> String {
        if !self.software {
            let reduced = match self.subgroups {
                true => "through subgroups",
                false => "in workgroup memory",
            };
            return format!(
                "a workgroup per {DECODE_ROWS_PER_WORKGROUP} output rows reduced {reduced}, \
                 prefill in {PREFILL_TILE}×{PREFILL_TILE} tiles"
            );
        }
        let worker = if self.subgroups { "subgroup" } else { "thread" };
        let shared = match self.shared_loads {
            true => ", activation loads shared across a subgroup",
            false => "",
        };
        format!("a {worker} per {SOFTWARE_ROWS_PER_WORKER} output rows{shared}")
    }

    /// Everything `device`'s adapter offers; `None` on the CPU backend.
    fn offered(device: &Device) -> Option<KernelPlan> {
        client_of(device).map(|client| KernelPlan::offered_by(device, &client))
    }

    /// Everything the adapter of `device`, a GPU with `client`, offers.
    fn offered_by(device: &Device, client: &Client) -> KernelPlan {
        let props = client.properties();
        // cubecl describes no physical device for a software adapter.
        let software = props.identity.physical.is_none();
        KernelPlan {
            subgroups: props.features.plane.contains(Plane::Ops),
            f16: props
                .type_usage(ElemType::Float(FloatKind::F16))
                .contains(TypeUsage::Arithmetic),
            software,
            shared_loads: software
                && adapter_subgroups(device)
                && shared_load_lanes(client).is_some(),
        }
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
/// name, what it offers and which kernels `plan` runs there.
pub fn describe_device(device: &Device, plan: KernelPlan) -> String {
    let Some(client) = client_of(device) else {
        return "cpu (burn-flex)".to_string();
    };
    let offered = KernelPlan::offered_by(device, &client);
    let props = client.properties();
    // The adapter's feature: cubecl reports none for a software adapter that has them.
    let subgroups = offered.subgroups || adapter_subgroups(device);
    format!(
        "{} (subgroups: {}, sizes {}-{}; shader-f16: {}; software adapter: {}; \
         kernels: {}, f16 products and KV cache: {})",
        props.identity.name,
        subgroups,
        props.hardware.plane_size_min,
        props.hardware.plane_size_max,
        offered.f16,
        offered.software,
        plan.shape(),
        plan.f16,
    )
}

/// How many lanes share a word's activation loads ([`KernelPlan::shared_loads`]): the
/// subgroup size, where the adapter reports one size (min = max) that divides the 8
/// activations of a word and fits in a software adapter's workgroup (so every subgroup is
/// whole). `None` otherwise. The kernel also takes a subgroup to be that many consecutive
/// invocations of the workgroup, aligned to the size: neither WebGPU nor Vulkan promises it,
/// but it is how both software adapters (llvmpipe, SwiftShader: one SIMD vector per
/// subgroup) form them, and the plan is only chosen on software adapters.
pub(crate) fn shared_load_lanes(client: &Client) -> Option<usize> {
    let hardware = &client.properties().hardware;
    let lanes = hardware.plane_size_min;
    (lanes == hardware.plane_size_max && lanes.is_power_of_two() && lanes <= SOFTWARE_WORKGROUP)
        .then_some(lanes as usize)
}
