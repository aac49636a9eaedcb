//! f16 where allowed: the KV cache (and the 4-bit products, tested with the kernels) in f16 on
//! adapters with shader-f16, f32 elsewhere. A test binary of its own because `allow_f16` is
//! process-wide: tests running beside it would see it. scripts/test.sh runs it on lavapipe
//! (shader-f16) with `PHI2_TEST_ALL_KERNELS=1`, where f16 must be in use, and on GL (none).

mod common;

use burn::tensor::DType;
use common::{load, logits_across_cache_growth, max_abs_diff, reference};
use phi2_web::{block_on, kernels, BackendKind};

#[test]
fn an_f16_kv_cache_stays_close_to_transformers_and_f32_stays_exact() {
    kernels::allow_f16(true);
    let (model, _) = load("phi-80", BackendKind::Wgpu);
    let device = model.device();
    let f16 = model.new_cache().dtype() == DType::F16;
    eprintln!(
        "{}: KV cache in f16: {f16}",
        kernels::describe_device(device)
    );
    if std::env::var("PHI2_TEST_ALL_KERNELS").is_ok_and(|v| v == "1") {
        assert!(f16, "an adapter with shader-f16 must get an f16 cache");
    }
    // f32 weights here: the cache is the only f16 in the model.
    let tolerance = if f16 { 2e-2 } else { 1e-4 };
    for case in reference("phi-80").cases {
        // One token at a time, so every key and value is read back from the cache.
        let mut cache = model.new_cache();
        let mut logits = None;
        for &id in &case.ids {
            logits = Some(model.forward(&[id], &mut cache));
        }
        let logits = block_on(logits.unwrap().into_data_async())
            .unwrap()
            .try_into_vec::<f32>()
            .unwrap();
        let diff = max_abs_diff(&logits, &case.last_logits);
        eprintln!("ids={}: max |Δlogit| = {diff:.2e}", case.ids.len());
        assert!(diff <= tolerance, "{diff} > {tolerance}");
    }
}

/// Growing an f16 cache keeps what it held, as an f32 one does (`tests/rust/reference.rs`).
#[test]
fn an_f16_cache_grows_like_an_f32_one() {
    kernels::allow_f16(true);
    let (model, _) = load("phi-80", BackendKind::Wgpu);
    eprintln!("cache dtype {:?}", model.new_cache().dtype());
    let (full, across) = logits_across_cache_growth(&model, 8);
    // Both runs round the same keys and values to the cache's type.
    let diff = max_abs_diff(&full, &across);
    assert!(diff <= 1e-3, "across the growth: {diff}");
}
