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

    /// Acquires the device. In the browser this must be awaited; natively it completes at once,
    /// and fails if the kernels already chosen ([`crate::kernels::choose_kernels`]: choose
    /// first) need what the adapter lacks.
    /// burn's wgpu runtime can be initialised once per process, so the device is kept and
    /// every later call (a second model, a reload) shares it.
    pub async fn device(self) -> Result<Device> {
        match self {
            BackendKind::Cpu => Ok(Device::flex()),
            BackendKind::Wgpu => wgpu_device().await,
        }
    }
}

/// Natively the device is also checked against the kernels chosen: cubecl reports subgroups
/// only for adapters that are not CPUs, so whether subgroup kernels can run comes from wgpu's
/// device ([`crate::kernels::record_device_subgroups`]). (In the browser wgpu cannot see that
/// feature; the package checks the adapter and says.)
#[cfg(not(target_arch = "wasm32"))]
async fn wgpu_device() -> Result<Device> {
    use burn::tensor::wgpu::wgpu::Features;
    static DEVICE: std::sync::OnceLock<std::result::Result<Device, String>> =
        std::sync::OnceLock::new();
    let device = DEVICE
        .get_or_init(|| {
            let (device, setup) = Device::wgpu_options()
                .init_with_setup()
                .map_err(|e| e.to_string())?;
            let subgroups = setup.device.features().contains(Features::SUBGROUP);
            crate::kernels::record_device_subgroups(subgroups);
            Ok(device)
        })
        .clone()
        .map_err(|e| Error::Device(format!("no wgpu adapter: {e}")))?;
    crate::kernels::check_kernel_choice(&device)?;
    Ok(device)
}

#[cfg(target_arch = "wasm32")]
async fn wgpu_device() -> Result<Device> {
    thread_local! {
        static DEVICE: std::cell::RefCell<Option<Device>> = const { std::cell::RefCell::new(None) };
    }
    if let Some(device) = DEVICE.with(|d| d.borrow().clone()) {
        return Ok(device);
    }
    let device = Device::wgpu_options()
        .init_async()
        .await
        .map_err(|e| Error::Device(format!("no WebGPU adapter: {e}")))?;
    DEVICE.with(|d| *d.borrow_mut() = Some(device.clone()));
    Ok(device)
}
