//! The readers of untrusted input — the bundle manifest, GGUF files, safetensors headers — on
//! arbitrary bytes and on mutations of valid files (flipped bytes, huge length fields,
//! truncation): each returns a value or an error, never panics, and never makes an allocation
//! much larger than its input, whatever a length field claims. A short property-based run for
//! CI; `fuzz/` has the cargo-fuzz targets for long runs.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::OnceLock;

use phi2_web::weights::assembler::WeightAssembler;
use phi2_web::weights::bundle::parse_manifest;
use phi2_web::weights::gguf::Gguf;
use phi2_web::weights::safetensors::add_safetensors;
use phi2_web::PhiConfig;
use proptest::prelude::*;

/// Records the largest allocation of the current thread.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.with(|l| l.set(l.get().max(layout.size())));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.with(|l| l.set(l.get().max(new_size)));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Runs `read` on `input` and checks the largest allocation it made: at most 64 KiB plus 48
/// bytes per input byte (a parsed item per byte at worst), never a claimed length.
fn bounded<T>(input: &[u8], read: impl FnOnce(&[u8]) -> T) -> T {
    LARGEST.with(|l| l.set(0));
    let out = read(input);
    let largest = LARGEST.with(Cell::get);
    let bound = 64 * 1024 + 48 * input.len();
    assert!(
        largest <= bound,
        "an allocation of {largest} bytes for {} input bytes",
        input.len()
    );
    out
}

/// `valid` with `edits` applied: bytes overwritten, 8-byte little-endian values planted (huge
/// lengths and counts), then cut to `keep` bytes.
fn mutate(valid: &[u8], edits: &[(usize, u8)], plants: &[(usize, u64)], keep: usize) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    if bytes.is_empty() {
        return bytes;
    }
    for &(at, byte) in edits {
        let at = at % bytes.len();
        bytes[at] = byte;
    }
    for &(at, value) in plants {
        let at = at % bytes.len();
        let end = (at + 8).min(bytes.len());
        bytes[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
    }
    bytes.truncate(keep.max(1).min(bytes.len()));
    bytes
}

fn tiny_config() -> PhiConfig {
    let text = std::fs::read_to_string(common::fixture("phi-tok/config.json")).unwrap();
    PhiConfig::from_json_str(&text).unwrap()
}

/// A valid manifest: the one `phi2 synth --preset tiny` writes.
fn valid_manifest() -> &'static [u8] {
    static MANIFEST: OnceLock<Vec<u8>> = OnceLock::new();
    MANIFEST.get_or_init(|| {
        let out = common::Scratch::new("parsers-manifest");
        let tokenizer = std::fs::read(common::fixture("phi-tok/tokenizer.json")).unwrap();
        phi2_web::weights::convert::synthesize(
            &tiny_config(),
            &tokenizer,
            &out,
            1 << 20,
            1,
            |_, _| {},
        )
        .unwrap();
        std::fs::read(out.join("manifest.json")).unwrap()
    })
}

fn valid_gguf() -> &'static [u8] {
    static GGUF: OnceLock<Vec<u8>> = OnceLock::new();
    GGUF.get_or_init(|| std::fs::read(common::fixture("gguf/kquants.gguf")).unwrap())
}

/// A valid safetensors file holding two of the tiny model's tensors.
fn valid_safetensors() -> &'static [u8] {
    static FILE: OnceLock<Vec<u8>> = OnceLock::new();
    FILE.get_or_init(|| {
        let config = tiny_config();
        let hidden = config.hidden_size;
        let norm: Vec<u8> = (0..hidden).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let dense: Vec<u8> = (0..hidden * hidden)
            .flat_map(|i| half::f16::from_f32(i as f32 / 100.0).to_le_bytes())
            .collect();
        let views = [
            (
                "model.layers.0.input_layernorm.weight",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![hidden], &norm)
                    .unwrap(),
            ),
            (
                "model.layers.0.self_attn.dense.weight",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F16,
                    vec![hidden, hidden],
                    &dense,
                )
                .unwrap(),
            ),
        ];
        safetensors::serialize(views, None).unwrap()
    })
}

fn read_manifest(bytes: &[u8]) -> bool {
    parse_manifest(bytes, "manifest.json").is_ok()
}

fn read_gguf(bytes: &[u8]) -> bool {
    match Gguf::parse(bytes, "model.gguf") {
        Ok(gguf) => {
            // What it parsed points inside the file.
            for tensor in &gguf.tensors {
                assert!(tensor.start + tensor.len <= bytes.len(), "{}", tensor.name);
            }
            let _ = gguf.phi_config();
            true
        }
        Err(_) => false,
    }
}

fn read_safetensors(bytes: &[u8]) -> bool {
    let device = burn::tensor::Device::flex();
    let mut assembler = WeightAssembler::new(tiny_config(), device);
    add_safetensors(&mut assembler, bytes, "model.safetensors").is_ok()
}

const CASES: u32 = 1500;

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_crash_a_reader(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        bounded(&bytes, read_manifest);
        bounded(&bytes, read_gguf);
        bounded(&bytes, read_safetensors);
    }

    #[test]
    fn mutated_manifests_never_crash(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        keep in any::<usize>(),
    ) {
        let bytes = mutate(valid_manifest(), &edits, &[], keep);
        bounded(&bytes, read_manifest);
    }

    #[test]
    fn mutated_gguf_files_never_crash(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        plants in proptest::collection::vec((0usize..512, any::<u64>()), 0..3),
        keep in any::<usize>(),
    ) {
        let bytes = mutate(valid_gguf(), &edits, &plants, keep);
        bounded(&bytes, read_gguf);
    }

    #[test]
    fn mutated_safetensors_never_crash(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        plants in proptest::collection::vec((0usize..256, any::<u64>()), 0..3),
        keep in any::<usize>(),
    ) {
        let bytes = mutate(valid_safetensors(), &edits, &plants, keep);
        bounded(&bytes, read_safetensors);
    }
}

/// The unmutated inputs are read, so the mutations above start from files the readers accept.
#[test]
fn the_valid_inputs_are_accepted() {
    assert!(read_manifest(valid_manifest()));
    assert!(read_gguf(valid_gguf()));
    assert!(read_safetensors(valid_safetensors()));
    eprintln!("property runs: {CASES} cases each for 4 properties (arbitrary bytes through all three readers)");
}
