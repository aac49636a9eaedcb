//! 4-bit bundles: HF → bundle conversion, loading, and the quantized model against the f32
//! model built from the same dequantized weights. (The kernels themselves: kernels.rs.)

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, max_abs_diff, reference, Scratch, BACKENDS};
use phi2_web::kernels::KernelOptions;
use phi2_web::loading::load_dir;
use phi2_web::weights::assembler::{host_layout, HostTensor, WeightAssembler};
use phi2_web::weights::bundle::{decode, ChunkStream, Manifest, TensorBytes, MANIFEST};
use phi2_web::weights::convert::convert_hf;
use phi2_web::weights::names;
use phi2_web::{block_on, BackendKind, Phi, SamplingParams, Session};

/// The f32 model built from a bundle's dequantized weights: what the 4-bit model must compute.
/// Tensors whose names `keep_4bit` picks stay 4-bit (a checkpoint mixing both).
fn dequantized_model(bundle: &Path, backend: BackendKind, keep_4bit: fn(&str) -> bool) -> Phi {
    let device = block_on(backend.device()).unwrap();
    let manifest =
        Manifest::parse(&std::fs::read_to_string(bundle.join(MANIFEST)).unwrap()).unwrap();
    let mut assembler = WeightAssembler::new(manifest.config.clone(), device.clone());
    let mut stream = ChunkStream::new(manifest.clone());
    for (i, chunk) in manifest.chunks.iter().enumerate() {
        let bytes = std::fs::read(bundle.join(&chunk.file)).unwrap();
        stream
            .push(i, &bytes, None, &chunk.file, |entry, words| {
                let Some(names::Target::One(slot)) = names::target(&entry.name, &manifest.config)
                else {
                    panic!("{}", entry.name)
                };
                let values = match decode(entry, words) {
                    TensorBytes::Q4(m) if keep_4bit(&entry.name) => {
                        return assembler.insert_q4(slot, m, "test");
                    }
                    TensorBytes::Q4(m) => m.dequantize(),
                    TensorBytes::F32(v) => v,
                };
                let tensor: HostTensor = host_layout(slot, entry.shape.clone(), values);
                assembler.insert(slot, tensor, "test")
            })
            .unwrap();
    }
    Phi::from_weights(
        assembler.finish().unwrap(),
        &device,
        KernelOptions::default(),
    )
    .unwrap()
}

#[test]
fn converted_bundles_run_like_their_dequantized_weights() {
    for fixture_name in ["phi-80", "phi-tok", "phi-80-old"] {
        let out = Scratch::new(&format!("bundle-{fixture_name}"));
        // Small chunks so tensors straddle chunk boundaries.
        let summary = convert_hf(&fixture(fixture_name), &out, 100_000, |_, _| {}).unwrap();
        assert!(summary.chunks > 1);
        for backend in BACKENDS {
            let (quantized, tokenizer) = load_dir(
                &out,
                &block_on(backend.device()).unwrap(),
                KernelOptions::default(),
            )
            .unwrap();
            let dense = dequantized_model(&out, backend, |_| false);
            // Layers mixing 4-bit and f32 weights are assembled in f32: the same function.
            let mixed = dequantized_model(&out, backend, |name| {
                name.contains("q_proj") || name.contains("fc2")
            });
            for case in reference(fixture_name).cases {
                let logits = |model: &Phi| {
                    let mut s =
                        Session::new(model, case.ids.clone(), SamplingParams::default()).unwrap();
                    block_on(s.logits(model)).unwrap()
                };
                let diff = max_abs_diff(&logits(&quantized), &logits(&dense));
                assert!(diff <= 1e-3, "{fixture_name} {backend:?}: {diff}");
                let diff = max_abs_diff(&logits(&mixed), &logits(&dense));
                assert!(diff <= 1e-4, "{fixture_name} {backend:?} mixed: {diff}");
                let greedy = |model: &Phi| {
                    let params = SamplingParams {
                        max_tokens: 10,
                        ..SamplingParams::default()
                    };
                    let mut s = Session::new(model, case.ids.clone(), params).unwrap();
                    while block_on(s.next(model, &tokenizer)).unwrap().is_some() {}
                    s.generated_ids().to_vec()
                };
                assert_eq!(
                    greedy(&quantized),
                    greedy(&dense),
                    "{fixture_name} {backend:?}"
                );
            }
        }
    }
}

#[test]
fn conversion_never_leaves_a_bundle_that_looks_complete() {
    let out = Scratch::new("bundle-exists");
    std::fs::create_dir_all(&out).unwrap();
    let err = convert_hf(&fixture("phi-80"), &out, 1 << 20, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    // A checkpoint missing a tensor fails and leaves neither the bundle nor its partial copy.
    let broken = Scratch::new("bundle-broken-src");
    std::fs::create_dir_all(&broken).unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixture("phi-tok").join(file), broken.join(file)).unwrap();
    }
    let index =
        std::fs::read_to_string(fixture("phi-tok").join("model.safetensors.index.json")).unwrap();
    std::fs::write(broken.join("model.safetensors.index.json"), &index).unwrap();
    let first_shard = phi2_web::weights::safetensors::shard_files(&index).unwrap()[0].clone();
    std::fs::copy(
        fixture("phi-tok").join(&first_shard),
        broken.join(&first_shard),
    )
    .unwrap();
    let out = Scratch::new("bundle-broken-out");
    let err = convert_hf(&broken, &out, 1 << 20, |_, _| {}).unwrap_err();
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
    assert!(!out.exists());
    assert!(!PathBuf::from(format!("{}.partial", out.display())).exists());
}

#[test]
fn corrupt_chunk_fails_the_load_naming_the_chunk() {
    let out = Scratch::new("bundle-corrupt");
    convert_hf(&fixture("phi-80"), &out, 100_000, |_, _| {}).unwrap();
    let chunk = out.join("chunk-00002.bin");
    let mut bytes = std::fs::read(&chunk).unwrap();
    bytes[5] ^= 0x40;
    std::fs::write(&chunk, bytes).unwrap();
    let device = block_on(BackendKind::Cpu.device()).unwrap();
    let err = load_dir(&out, &device, KernelOptions::default())
        .err()
        .expect("a corrupt chunk must fail")
        .to_string();
    assert!(
        err.contains("chunk-00002.bin") && err.contains("sha256"),
        "{err}"
    );
    std::fs::remove_file(&chunk).unwrap();
    let err = load_dir(&out, &device, KernelOptions::default())
        .err()
        .expect("a missing chunk must fail")
        .to_string();
    assert!(
        err.contains("chunk-00002.bin") && err.contains("not found"),
        "{err}"
    );
}
