//! Getting weights into the model: checkpoint name mapping ([`names`]), the format readers
//! (safetensors, the phi2-web bundle, GGUF), the converter and downloader of bundles, and the
//! [`assembler`] that places every format's tensors on the device. Loading a whole model
//! directory is [`crate::loading`].

pub mod assembler;
pub mod bundle;
#[cfg(not(target_arch = "wasm32"))]
pub mod convert;
#[cfg(feature = "cli")]
pub mod download;
pub mod gguf;
pub mod names;
pub mod safetensors;
