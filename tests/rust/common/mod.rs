//! Shared by the integration tests: fixture paths, reference outputs, backends.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;

use phi2_web::kernels::KernelOptions;
use phi2_web::model::FIRST_ALLOCATION;
use phi2_web::{block_on, BackendKind, Phi, PhiTokenizer, SamplingParams, Session};
use serde::Deserialize;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// What `scripts/make_fixtures.py` recorded from Hugging Face transformers.
#[derive(Deserialize)]
pub struct Reference {
    pub cases: Vec<Case>,
}

#[derive(Deserialize)]
pub struct Case {
    #[serde(default)]
    pub prompt: Option<String>,
    pub ids: Vec<u32>,
    pub last_logits: Vec<f32>,
    pub greedy_ids: Vec<u32>,
}

pub fn reference(name: &str) -> Reference {
    let path = fixture(name).join("reference.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/make_fixtures.py)", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The native GPU backend runs in CI on Mesa's llvmpipe through GL (scripts/test.sh hides the
/// Vulkan ICDs: lavapipe crashes in cubecl's pipelines). Both backends are always tested.
pub const BACKENDS: [BackendKind; 2] = [BackendKind::Cpu, BackendKind::Wgpu];

pub fn load(name: &str, backend: BackendKind) -> (Phi, PhiTokenizer) {
    load_with(name, backend, KernelOptions::default())
}

pub fn load_with(name: &str, backend: BackendKind, options: KernelOptions) -> (Phi, PhiTokenizer) {
    let device = block_on(backend.device()).unwrap();
    phi2_web::loading::load_dir(&fixture(name), &device, options)
        .unwrap_or_else(|e| panic!("loading {name} on {backend:?}: {e}"))
}

/// The logits of the position after `ids`.
pub fn next_logits(model: &Phi, ids: &[u32]) -> Vec<f32> {
    let mut session = Session::new(model, ids.to_vec(), SamplingParams::default()).unwrap();
    block_on(session.logits(model)).unwrap()
}

/// `count` tokens of greedy continuation of `ids`.
pub fn greedy_ids(model: &Phi, tokenizer: &PhiTokenizer, ids: &[u32], count: usize) -> Vec<u32> {
    let params = SamplingParams {
        max_tokens: count,
        ..SamplingParams::default()
    };
    let mut session = Session::new(model, ids.to_vec(), params).unwrap();
    while block_on(session.next(model, tokenizer)).unwrap().is_some() {}
    session.generated_ids().to_vec()
}

/// The last logits of `FIRST_ALLOCATION + extra` tokens (`extra` ≥ 1), run in one pass (whose
/// cache grows before anything is cached), then with the cache growing mid-decode: all but 4 of
/// the first allocation's tokens at once, the rest one at a time. Checks the cache's
/// allocation at each stage.
pub fn logits_across_cache_growth(model: &Phi, extra: usize) -> (Vec<f32>, Vec<f32>) {
    let vocab = model.config().vocab_size as u32;
    let ids: Vec<u32> = (0..(FIRST_ALLOCATION + extra) as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let read = |logits: burn::tensor::Tensor<2>| {
        block_on(logits.into_data_async())
            .unwrap()
            .try_into_vec::<f32>()
            .unwrap()
    };
    let mut cache = model.new_cache();
    let full = read(model.forward(&ids, &mut cache));
    assert_eq!(cache.allocated(), cache.capacity(), "one pass");

    let mut cache = model.new_cache();
    let before = FIRST_ALLOCATION - 4;
    let mut logits = model.forward(&ids[..before], &mut cache);
    assert_eq!(cache.allocated(), FIRST_ALLOCATION, "before the growth");
    for &id in &ids[before..] {
        logits = model.forward(&[id], &mut cache);
    }
    assert_eq!(cache.allocated(), cache.capacity(), "after the growth");
    (full, read(logits))
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A directory under the system temp dir for one test, removed (with the `.partial` directory
/// a conversion may leave) when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("phi2-web-{name}-{}", std::process::id()));
        let scratch = Scratch(dir);
        scratch.remove();
        scratch
    }

    fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir_all(format!("{}.partial", self.0.display()));
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.remove();
    }
}
