//! Choosing where the model runs: burn's CPU backend (flex) or wgpu (Vulkan/Metal/DX12/GL
//! natively, WebGPU in the browser).

use burn::tensor::Device;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Cpu,
    Wgpu,
}

impl std::str::FromStr for BackendKind {
    type Err = Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "cpu" => Ok(BackendKind::Cpu),
            "wgpu" | "webgpu" | "gpu" => Ok(BackendKind::Wgpu),
            other => Err(Error::option(
                "backend",
                format!("`{other}` is not one of cpu, wgpu"),
            )),
        }
    }
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
        }
    }

    /// Acquires the device (natively it completes at once). burn's wgpu runtime can be
    /// initialised once per process, so the device is kept and every later call (a second
    /// model, a reload) shares it.
    #[cfg(not(target_arch = "wasm32"))]
    pub async fn device(self) -> Result<Device> {
        match self {
            BackendKind::Cpu => Ok(Device::flex()),
            BackendKind::Wgpu => native_wgpu().map(|gpu| gpu.device.clone()),
        }
    }

    /// Acquires the device; `adapter_subgroups` says whether the WebGPU adapter has the
    /// `subgroups` feature (the package asks for it on the device wherever it is offered),
    /// which wgpu's WebGPU backend cannot see. The first call in a realm makes the device;
    /// later ones share it.
    #[cfg(target_arch = "wasm32")]
    #[cfg_attr(not(feature = "gpu"), allow(unused_variables))]
    pub async fn device(self, adapter_subgroups: bool) -> Result<Device> {
        match self {
            BackendKind::Cpu => Ok(Device::flex()),
            #[cfg(feature = "gpu")]
            BackendKind::Wgpu => webgpu(adapter_subgroups).await.map(|gpu| gpu.device),
            #[cfg(not(feature = "gpu"))]
            BackendKind::Wgpu => Err(Error::Device(
                "this wasm build runs on the CPU only (the package's threads build)".into(),
            )),
        }
    }
}

/// The wgpu device and what its adapter offers that cubecl cannot see.
#[derive(Clone)]
struct Gpu {
    device: Device,
    /// The adapter's `subgroups` feature: cubecl reports subgroups only for adapters that are
    /// not CPUs, though lavapipe and SwiftShader have them.
    subgroups: bool,
}

/// Whether `device` is a wgpu device whose adapter has the `subgroups` feature, as recorded
/// when the device was made.
pub fn adapter_subgroups(device: &Device) -> bool {
    made_gpu().is_some_and(|gpu| &gpu.device == device && gpu.subgroups)
}

#[cfg(not(target_arch = "wasm32"))]
static NATIVE_GPU: std::sync::OnceLock<std::result::Result<Gpu, String>> =
    std::sync::OnceLock::new();

#[cfg(not(target_arch = "wasm32"))]
fn native_wgpu() -> Result<&'static Gpu> {
    use burn::tensor::wgpu::wgpu::Features;
    NATIVE_GPU
        .get_or_init(|| {
            let (device, setup) = Device::wgpu_options()
                .init_with_setup()
                .map_err(|e| e.to_string())?;
            let subgroups = setup.device.features().contains(Features::SUBGROUP);
            Ok(Gpu { device, subgroups })
        })
        .as_ref()
        .map_err(|e| Error::Device(format!("no wgpu adapter: {e}")))
}

#[cfg(not(target_arch = "wasm32"))]
fn made_gpu() -> Option<Gpu> {
    NATIVE_GPU
        .get()
        .and_then(|made| made.as_ref().ok())
        .cloned()
}

#[cfg(target_arch = "wasm32")]
thread_local! {
    static WEB_GPU: std::cell::RefCell<Option<Gpu>> = const { std::cell::RefCell::new(None) };
}

#[cfg(all(target_arch = "wasm32", feature = "gpu"))]
async fn webgpu(adapter_subgroups: bool) -> Result<Gpu> {
    if let Some(gpu) = made_gpu() {
        return Ok(gpu);
    }
    let device = Device::wgpu_options()
        .init_async()
        .await
        .map_err(|e| Error::Device(format!("no WebGPU adapter: {e}")))?;
    let gpu = Gpu {
        device,
        subgroups: adapter_subgroups,
    };
    WEB_GPU.with(|made| *made.borrow_mut() = Some(gpu.clone()));
    Ok(gpu)
}

#[cfg(target_arch = "wasm32")]
fn made_gpu() -> Option<Gpu> {
    WEB_GPU.with(|made| made.borrow().clone())
}
