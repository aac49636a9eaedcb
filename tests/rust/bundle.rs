//! 4-bit bundles: the kernels against a plain reference, HF → bundle conversion, loading, and
//! the quantized model against the f32 model built from the same dequantized weights.

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, max_abs_diff, reference, Scratch, BACKENDS};
use phi2_web::kernels::{describe_device, is_cpu, Epilogue, KernelPlan, Q4Weight};
use phi2_web::quant::Q4Matrix;
use phi2_web::weights::bundle::{decode, ChunkStream, Manifest, TensorBytes, MANIFEST};
use phi2_web::weights::convert::convert_hf;
use phi2_web::weights::{host_layout, load_dir, names, HostTensor, WeightAssembler};
use phi2_web::{block_on, BackendKind, Phi, SamplingParams, Session};

fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn q4_matmul_and_row_lookup_match_the_reference_on_odd_shapes() {
    for backend in BACKENDS {
        let device = block_on(backend.device()).unwrap();
        for (tokens, rows, cols) in [
            (1, 33, 70),
            (3, 17, 64),
            (17, 5, 160),
            (1, 1, 1),
            (2, 40, 33),
            // More workgroups than WebGPU allows in one grid dimension (65535).
            (520, 8200, 40),
        ] {
            let weights = pseudo_random(rows * cols, (rows * cols) as u64);
            let matrix = Q4Matrix::quantize(&weights, rows, cols);
            let x = pseudo_random(tokens * cols, 7);
            let bias = pseudo_random(rows, 3);
            let mut expected = matrix.matmul_reference(&x, tokens);
            for (i, v) in expected.iter_mut().enumerate() {
                *v += bias[i % rows];
            }
            // Row lookups (the embedding), duplicates and the last row included.
            let ids = [rows - 1, 0, rows / 2, rows - 1].map(|r| r as u32);
            let expected_rows: Vec<f32> = ids
                .iter()
                .flat_map(|&id| matrix.dequantize_row(id as usize))
                .collect();
            let weight = Q4Weight::upload(matrix, &device);
            let looked_up = block_on(weight.rows_of(&ids, &device).into_data_async())
                .unwrap()
                .try_into_vec::<f32>()
                .unwrap();
            assert_eq!(
                looked_up, expected_rows,
                "{backend:?} rows of {rows}x{cols}"
            );
            let x = burn::tensor::Tensor::<2>::from_data(
                burn::tensor::TensorData::new(x, [tokens, cols]),
                &device,
            );
            let bias = burn::tensor::Tensor::<1>::from_data(
                burn::tensor::TensorData::new(bias, [rows]),
                &device,
            );
            // The epilogue inside the kernel: GELU on the first outputs (against transformers'
            // gelu_new formula), then a residual.
            let gelu = |v: f32| 0.5 * v * (1.0 + (0.797_884_6 * (v + 0.044715 * v * v * v)).tanh());
            let residual = pseudo_random(tokens * rows, 5);
            let epilogue = |gelu_outputs: usize, add_residual: bool| {
                let expected: Vec<f32> = (0..tokens * rows)
                    .map(|i| {
                        let v = expected[i];
                        let v = if i % rows < gelu_outputs { gelu(v) } else { v };
                        v + if add_residual { residual[i] } else { 0.0 }
                    })
                    .collect();
                let residual = add_residual.then(|| {
                    burn::tensor::Tensor::<2>::from_data(
                        burn::tensor::TensorData::new(residual.clone(), [tokens, rows]),
                        &device,
                    )
                });
                let then = Epilogue {
                    gelu_outputs,
                    residual,
                };
                (then, expected)
            };
            let cases = [
                epilogue(0, false),
                epilogue(rows, false),
                epilogue(rows / 2 + 1, true),
            ];
            let plans = plans_to_test(&device);
            for plan in &plans {
                for (then, expected) in &cases {
                    let label = format!(
                        "gelu {} residual {}",
                        then.gelu_outputs,
                        then.residual.is_some()
                    );
                    let then = then.clone();
                    let y = match plan {
                        Some(plan) => weight.matmul_with(x.clone(), &bias, then, *plan),
                        None => weight.matmul(x.clone(), &bias, then),
                    };
                    assert_eq!(y.dims(), [tokens, rows]);
                    let got = block_on(y.into_data_async())
                        .unwrap()
                        .try_into_vec::<f32>()
                        .unwrap();
                    let diff = max_abs_diff(&got, expected);
                    // f16 products carry ~11 bits: a few thousandths on sums of up to 160 terms.
                    let tolerance = if plan.is_some_and(|p| p.f16) {
                        2e-2
                    } else {
                        1e-4
                    };
                    assert!(
                        diff < tolerance,
                        "{backend:?} {plan:?} {label} {tokens}x{rows}x{cols}: {diff}"
                    );
                }
            }
        }
    }
}

#[test]
fn assembled_4bit_weights_hold_their_parts_and_zeros_elsewhere() {
    // Parts with an odd number of blocks per row (70 columns: 3 blocks), side by side along
    // rows and along columns, one starting on an odd block, and gaps between them; then the
    // whole uploaded, its rows read back through the kernels' layout (a row's last scale word
    // half empty).
    let a = Q4Matrix::quantize(&pseudo_random(5 * 70, 1), 5, 70);
    let b = Q4Matrix::quantize(&pseudo_random(3 * 40, 2), 3, 40);
    let (rows, cols) = (9, 168);
    let parts = [(&a, 0, 0), (&b, 1, 128), (&b, 6, 96)];
    let mut expected = vec![0.0f32; rows * cols];
    for (part, row, col) in parts {
        for r in 0..part.rows {
            for c in 0..part.cols {
                expected[(row + r) * cols + col + c] = part.value(r, c);
            }
        }
    }
    let host = Q4Matrix::assemble(rows, cols, &parts);
    assert_eq!(host.dequantize(), expected, "host");
    for backend in BACKENDS {
        let device = block_on(backend.device()).unwrap();
        let assembled = Q4Weight::upload(host.clone(), &device);
        let ids: Vec<u32> = (0..rows as u32).collect();
        let got = block_on(assembled.rows_of(&ids, &device).into_data_async())
            .unwrap()
            .try_into_vec::<f32>()
            .unwrap();
        assert_eq!(got, expected, "{backend:?}");
    }
}

#[test]
fn layer_norm_kernel_matches_the_reference_in_every_plan() {
    let device = block_on(BackendKind::Wgpu.device()).unwrap();
    let eps = 1e-5;
    for (rows, cols) in [(1, 70), (3, 300), (2, 2560)] {
        // Values far from zero, as in Phi-2's residual stream, where a careless variance loses
        // digits.
        let x: Vec<f32> = pseudo_random(rows * cols, cols as u64)
            .iter()
            .map(|v| 40.0 + 8.0 * v)
            .collect();
        let weight = pseudo_random(cols, 11);
        let bias = pseudo_random(cols, 13);
        let mut expected = Vec::with_capacity(rows * cols);
        for row in x.chunks(cols) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
            for (c, &v) in row.iter().enumerate() {
                let normed = (v as f64 - mean) / (var + eps).sqrt();
                expected.push((normed * weight[c] as f64 + bias[c] as f64) as f32);
            }
        }
        let tensor =
            |values: Vec<f32>, shape: Vec<usize>| burn::tensor::TensorData::new(values, shape);
        let x = burn::tensor::Tensor::<2>::from_data(tensor(x, vec![rows, cols]), &device);
        let weight = burn::tensor::Tensor::<1>::from_data(tensor(weight, vec![cols]), &device);
        let bias = burn::tensor::Tensor::<1>::from_data(tensor(bias, vec![cols]), &device);
        for plan in plans_to_test(&device).into_iter().flatten() {
            let y = phi2_web::kernels::layer_norm(x.clone(), &weight, &bias, eps, plan);
            let got = block_on(y.into_data_async())
                .unwrap()
                .try_into_vec::<f32>()
                .unwrap();
            let diff = max_abs_diff(&got, &expected);
            assert!(diff < 1e-4, "{plan:?} {rows}x{cols}: {diff}");
        }
    }
}

/// The CPU backend's one way, or every kernel plan the GPU device supports. scripts/test.sh
/// also runs this test on lavapipe (Vulkan), which has shader-f16 and subgroups (of one size), with
/// `PHI2_TEST_ALL_KERNELS=1`: there every plan runs, including the subgroup kernels cubecl would
/// not pick on a CPU adapter, and an adapter without f16, or not taken for a software adapter,
/// fails the test instead of testing less.
fn plans_to_test(device: &burn::tensor::Device) -> Vec<Option<KernelPlan>> {
    if is_cpu(device) {
        return vec![None];
    }
    let plans = if std::env::var("PHI2_TEST_ALL_KERNELS").is_ok_and(|v| v == "1") {
        let offered = KernelPlan::supported(device);
        assert!(
            offered.iter().any(|p| p.f16),
            "{}: no shader-f16",
            describe_device(device)
        );
        // lavapipe is a CPU: it must get the threads shaped for software adapters, and
        // (having subgroups of one size) their shared activation loads.
        assert!(
            KernelPlan::best(device).is_some_and(|p| p.software && p.shared_loads),
            "{}: not recognised as a software adapter with subgroups",
            describe_device(device)
        );
        KernelPlan::all()
    } else {
        KernelPlan::supported(device)
    };
    eprintln!("{}: testing {plans:?}", describe_device(device));
    plans.into_iter().map(Some).collect()
}

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
    Phi::from_weights(assembler.finish().unwrap(), &device)
}

#[test]
fn converted_bundles_run_like_their_dequantized_weights() {
    for fixture_name in ["phi-80", "phi-tok", "phi-80-old"] {
        let out = Scratch::new(&format!("bundle-{fixture_name}"));
        // Small chunks so tensors straddle chunk boundaries.
        let summary = convert_hf(&fixture(fixture_name), &out, 100_000, |_, _| {}).unwrap();
        assert!(summary.chunks > 1);
        for backend in BACKENDS {
            let (quantized, tokenizer) =
                load_dir(&out, &block_on(backend.device()).unwrap()).unwrap();
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
    let first_shard = phi2_web::weights::shard_files(&index).unwrap()[0].clone();
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
    let err = load_dir(&out, &device)
        .err()
        .expect("a corrupt chunk must fail")
        .to_string();
    assert!(
        err.contains("chunk-00002.bin") && err.contains("sha256"),
        "{err}"
    );
    std::fs::remove_file(&chunk).unwrap();
    let err = load_dir(&out, &device)
        .err()
        .expect("a missing chunk must fail")
        .to_string();
    assert!(
        err.contains("chunk-00002.bin") && err.contains("not found"),
        "{err}"
    );
}
