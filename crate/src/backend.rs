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

    /// Acquires the device. In the browser this must be awaited; natively it completes at once.
    /// burn's wgpu runtime can be initialised once per process, so the device is kept and
    /// every later call (a second model, a reload) shares it.
    pub async fn device(self) -> Result<Device> {
        match self {
            BackendKind::Cpu => Ok(Device::flex()),
            BackendKind::Wgpu => wgpu_device().await,
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
async fn wgpu_device() -> Result<Device> {
    static DEVICE: std::sync::OnceLock<std::result::Result<Device, String>> =
        std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| Device::wgpu_options().init().map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| Error::Device(format!("no wgpu adapter: {e}")))
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
