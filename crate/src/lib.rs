//! phi2-web: Microsoft's Phi-2 on burn, natively and in the browser over WebGPU.
//!
//! One module per concern: [`config`], [`model`] (Phi, named as transformers names it),
//! [`kernels`] (the GPU kernels by family, with their CPU paths), [`quant`] (the 4-bit
//! layout), [`weights`] (checkpoint formats and assembling them on the device), [`loading`]
//! (a model directory from disk or a URL), [`memory`] (what a model needs of the device),
//! [`tokenizer`], [`generation`] (sampling and the step API), [`bench`](mod@bench),
//! [`backend`], and the wasm bindings in `wasm`.

pub mod backend;
pub mod bench;
pub mod chat;
pub mod config;
pub mod constraint;
pub mod error;
pub mod generation;
pub mod kernels;
pub mod loading;
pub mod memory;
pub mod model;
pub mod quant;
pub mod tokenizer;
pub mod weights;

#[cfg(target_arch = "wasm32")]
mod wasm;

pub use backend::BackendKind;
pub use config::PhiConfig;
pub use error::{Error, Result};
pub use generation::{GenerationStats, SamplingParams, Session, StopReason, Timings, Token};
pub use model::{KvCache, Phi};
pub use tokenizer::{PhiTokenizer, TextStream};

/// Drives one of the crate's async functions to completion on native targets. Every device
/// read-back is async so that the browser never blocks; natively we simply wait.
#[cfg(not(target_arch = "wasm32"))]
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    futures_lite::future::block_on(future)
}
