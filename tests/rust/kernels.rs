//! The kernels against plain references: the 4-bit matmul and its epilogue, row lookups and
//! LayerNorm in every plan the device runs (every plan there is on lavapipe), f16 where the
//! options allow it, and each model keeping the kernel options it was loaded with.

mod common;

use burn::tensor::{DType, Device};
use common::{fixture, load_with, logits_across_cache_growth, max_abs_diff, reference, BACKENDS};
use phi2_web::kernels::{
    describe_device, is_cpu, Epilogue, KernelChoice, KernelOptions, KernelPlan, LayerNorm, Q4Weight,
};
use phi2_web::loading::load_dir;
use phi2_web::quant::Q4Matrix;
use phi2_web::{block_on, BackendKind};

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
            // Prefill tiles cut on every side, columns ending mid-block.
            (70, 130, 100),
        ] {
            let weights = pseudo_random(rows * cols, (rows * cols) as u64);
            let matrix = Q4Matrix::quantize(&weights, rows, cols);
            let x = pseudo_random(tokens * cols, 7);
            let bias = pseudo_random(rows, 3);
            let with_bias = |mut y: Vec<f32>| {
                for (i, v) in y.iter_mut().enumerate() {
                    *v += bias[i % rows];
                }
                y
            };
            let expected = with_bias(matrix.matmul_reference(&x, tokens));
            // A LayerNorm before the matmul (inside the decode kernel where it fits): against
            // the reference on the normed activations.
            let (norm_weight, norm_bias) = (pseudo_random(cols, 11), pseudo_random(cols, 13));
            let normed = layer_norm_reference(&x, &norm_weight, &norm_bias, EPS);
            let expected_normed = with_bias(matrix.matmul_reference(&normed, tokens));
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

            let norm = LayerNorm {
                weight: vector(norm_weight, &device),
                bias: vector(norm_bias, &device),
                eps: EPS,
            };
            let plans = plans_to_test(&device);
            for plan in &plans {
                let y = weight.matmul(x.clone(), Some(&norm), &bias, Epilogue::default(), *plan);
                let got = block_on(y.into_data_async())
                    .unwrap()
                    .try_into_vec::<f32>()
                    .unwrap();
                let diff = max_abs_diff(&got, &expected_normed);
                let tolerance = if plan.f16 { 5e-2 } else { 1e-4 };
                assert!(
                    diff < tolerance,
                    "{backend:?} {plan:?} LayerNorm first {tokens}x{rows}x{cols}: {diff}"
                );
                // The decode kernel's other shapes (`phi2 bench --matmuls` times them).
                for decode_rows in [2, 4] {
                    let y = weight.matmul_with(
                        x.clone(),
                        None,
                        &bias,
                        Epilogue::default(),
                        *plan,
                        decode_rows,
                    );
                    let got = block_on(y.into_data_async())
                        .unwrap()
                        .try_into_vec::<f32>()
                        .unwrap();
                    let diff = max_abs_diff(&got, &cases[0].1);
                    assert!(
                        diff < tolerance,
                        "{backend:?} {plan:?} {decode_rows} rows per workgroup \
                         {tokens}x{rows}x{cols}: {diff}"
                    );
                }
                for (then, expected) in &cases {
                    let label = format!(
                        "gelu {} residual {}",
                        then.gelu_outputs,
                        then.residual.is_some()
                    );
                    let y = weight.matmul(x.clone(), None, &bias, then.clone(), *plan);
                    assert_eq!(y.dims(), [tokens, rows]);
                    let got = block_on(y.into_data_async())
                        .unwrap()
                        .try_into_vec::<f32>()
                        .unwrap();
                    let diff = max_abs_diff(&got, expected);
                    // f16 products carry ~11 bits: a few thousandths on sums of up to 160 terms.
                    let tolerance = if plan.f16 { 2e-2 } else { 1e-4 };
                    assert!(
                        diff < tolerance,
                        "{backend:?} {plan:?} {label} {tokens}x{rows}x{cols}: {diff}"
                    );
                }
            }
        }
    }
}

/// Both attention kernels (a GPU's one workgroup per head and token, a software adapter's
/// thread per score) against burn's tensor ops on the CPU backend, on contexts longer than the
/// first one's chunk of positions (256), prompts crossing a chunk's end, and a head wider than
/// a workgroup's first 64 threads (80 dims, 32 rotated, as Phi-2's).
#[test]
fn attention_kernel_matches_the_tensor_ops_across_chunks() {
    let (heads, head_dim, rot, capacity) = (2, 80, 32, 600);
    let hidden = heads * head_dim;
    let q_at = 5;
    let stride = q_at + 3 * hidden + 3;
    let devices = BACKENDS.map(|backend| block_on(backend.device()).unwrap());
    let read = |t: burn::tensor::Tensor<2>| {
        block_on(t.into_data_async())
            .unwrap()
            .try_into_vec::<f32>()
            .unwrap()
    };
    let software = KernelPlan {
        software: true,
        ..KernelPlan::PORTABLE
    };
    for (plan, (start, count)) in [KernelPlan::PORTABLE, software]
        .into_iter()
        .flat_map(|plan| [(0, 5), (300, 1), (250, 20), (530, 70)].map(|case| (plan, case)))
    {
        let inner = pseudo_random(count * stride, start as u64);
        let cached = pseudo_random(heads * capacity * head_dim, 17);
        // Any tables do: both sides read the same ones.
        let cos = pseudo_random(capacity * rot, 19);
        let sin = pseudo_random(capacity * rot, 23);
        let results = devices.clone().map(|device| {
            let tensor2 = |values: &[f32], shape: [usize; 2]| {
                burn::tensor::Tensor::<2>::from_data(
                    burn::tensor::TensorData::new(values.to_vec(), shape),
                    &device,
                )
            };
            let cache = || {
                burn::tensor::Tensor::<3>::from_data(
                    burn::tensor::TensorData::new(cached.clone(), [heads, capacity, head_dim]),
                    &device,
                )
            };
            let layer = phi2_web::kernels::attention::LayerCache {
                keys: cache(),
                values: cache(),
            };
            let (cos, sin) = (
                tensor2(&cos, [capacity, rot]),
                tensor2(&sin, [capacity, rot]),
            );
            let (out, layer) = phi2_web::kernels::attention(
                tensor2(&inner, [count, stride]),
                q_at,
                layer,
                [&cos, &sin],
                start,
                0.1,
                plan,
            );
            let new = |t: burn::tensor::Tensor<3>| {
                read(t.narrow(1, start, count).reshape([heads * count, head_dim]))
            };
            (read(out), new(layer.keys), new(layer.values))
        });
        let [cpu, gpu] = results;
        let label = format!("{plan:?}: {count} tokens after {start}");
        assert!(max_abs_diff(&gpu.0, &cpu.0) < 1e-4, "outputs, {label}");
        assert!(max_abs_diff(&gpu.1, &cpu.1) < 1e-5, "new keys, {label}");
        assert_eq!(gpu.2, cpu.2, "new values, {label}");
    }
}

/// The greedy pick: the largest logit's first id on ties (within one thread's share and
/// across threads), and the sum that stands for the logits' finiteness.
#[test]
fn greedy_pick_takes_the_first_largest_logit() {
    for backend in BACKENDS {
        let device = block_on(backend.device()).unwrap();
        for (vocab, ties) in [
            (1, vec![]),
            (300, vec![299]),
            (51200, vec![811, 555, 50000]),
        ] {
            let mut logits = pseudo_random(vocab, vocab as u64);
            // 555 and 811 fall to one thread of 256, 50000 to another.
            for &at in &ties {
                logits[at] = 2.0;
            }
            let first = logits
                .iter()
                .enumerate()
                .fold(0, |best, (i, &v)| if v > logits[best] { i } else { best });
            let logits_tensor = burn::tensor::Tensor::<2>::from_data(
                burn::tensor::TensorData::new(logits.clone(), [1, vocab]),
                &device,
            );
            let got =
                block_on(phi2_web::kernels::greedy_candidates(logits_tensor).into_data_async())
                    .unwrap()
                    .try_into_vec::<f32>()
                    .unwrap();
            let sum: f32 = logits.iter().sum();
            assert!(
                (got[0] - sum).abs() < 1e-2,
                "{backend:?} {vocab}: sum {got:?}"
            );
            assert_eq!(
                got[1..],
                [logits[first], first as f32],
                "{backend:?} {vocab}"
            );
        }
    }
}

const EPS: f64 = 1e-5;

/// LayerNorm of each row of `x` (rows as long as `weight`), computed in f64.
fn layer_norm_reference(x: &[f32], weight: &[f32], bias: &[f32], eps: f64) -> Vec<f32> {
    let cols = weight.len();
    let mut normed = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        for (c, &v) in row.iter().enumerate() {
            let value = (v as f64 - mean) / (var + eps).sqrt();
            normed.push((value * weight[c] as f64 + bias[c] as f64) as f32);
        }
    }
    normed
}

fn vector(values: Vec<f32>, device: &Device) -> burn::tensor::Tensor<1> {
    let len = values.len();
    burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(values, [len]), device)
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
    let eps = EPS;
    for (rows, cols) in [(1, 70), (3, 300), (2, 2560)] {
        // Values far from zero, as in Phi-2's residual stream, where a careless variance loses
        // digits.
        let x: Vec<f32> = pseudo_random(rows * cols, cols as u64)
            .iter()
            .map(|v| 40.0 + 8.0 * v)
            .collect();
        let weight = pseudo_random(cols, 11);
        let bias = pseudo_random(cols, 13);
        let expected = layer_norm_reference(&x, &weight, &bias, eps);
        let tensor =
            |values: Vec<f32>, shape: Vec<usize>| burn::tensor::TensorData::new(values, shape);
        let x = burn::tensor::Tensor::<2>::from_data(tensor(x, vec![rows, cols]), &device);
        let weight = burn::tensor::Tensor::<1>::from_data(tensor(weight, vec![cols]), &device);
        let bias = burn::tensor::Tensor::<1>::from_data(tensor(bias, vec![cols]), &device);
        for plan in plans_to_test(&device) {
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

/// The CPU backend's one way (its host loop and tensor ops take no plan), or every kernel plan
/// the GPU device supports. scripts/test.sh also runs these tests on lavapipe (Vulkan), which
/// has shader-f16 and subgroups (of one size), with `PHI2_TEST_ALL_KERNELS=1`: there every plan
/// runs, including the subgroup kernels cubecl would not pick on a CPU adapter, and an adapter
/// without f16, or not taken for a software adapter, fails the test instead of testing less.
fn plans_to_test(device: &Device) -> Vec<KernelPlan> {
    if is_cpu(device) {
        return vec![KernelPlan::PORTABLE];
    }
    let auto = KernelPlan::for_device(device, KernelOptions::default()).unwrap();
    let plans = if all_kernels() {
        let offered = KernelPlan::supported(device);
        assert!(
            offered.iter().any(|p| p.f16),
            "{}: no shader-f16",
            describe_device(device, auto)
        );
        // lavapipe is a CPU: it must get the threads shaped for software adapters, and
        // (having subgroups of one size) their shared activation loads.
        assert!(
            auto.software && auto.shared_loads,
            "{}: not recognised as a software adapter with subgroups",
            describe_device(device, auto)
        );
        KernelPlan::all()
    } else {
        KernelPlan::supported(device)
    };
    eprintln!("{}: testing {plans:?}", describe_device(device, auto));
    plans
}

/// scripts/test.sh sets it on lavapipe, where every kernel variant and f16 must run.
fn all_kernels() -> bool {
    std::env::var("PHI2_TEST_ALL_KERNELS").is_ok_and(|v| v == "1")
}

const F16: KernelOptions = KernelOptions {
    kernels: KernelChoice::Auto,
    f16: true,
};

#[test]
fn an_f16_kv_cache_stays_close_to_transformers_and_f32_stays_exact() {
    let (model, _) = load_with("phi-80", BackendKind::Wgpu, F16);
    let f16 = model.new_cache().dtype() == DType::F16;
    eprintln!(
        "{}: KV cache in f16: {f16}",
        describe_device(model.device(), model.kernel_plan())
    );
    if all_kernels() {
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
    let (model, _) = load_with("phi-80", BackendKind::Wgpu, F16);
    eprintln!("cache dtype {:?}", model.new_cache().dtype());
    let (full, across) = logits_across_cache_growth(&model, 8);
    // Both runs round the same keys and values to the cache's type.
    let diff = max_abs_diff(&full, &across);
    assert!(diff <= 1e-3, "across the growth: {diff}");
}

/// Options go with each load: a model loaded after another with other options changes nothing
/// of the first (they were process-wide settings, which a later load overwrote).
#[test]
fn each_model_keeps_the_kernel_options_it_was_loaded_with() {
    let device = block_on(BackendKind::Wgpu.device()).unwrap();
    let load = |options| load_dir(&fixture("phi-80"), &device, options).unwrap().0;
    let portable = load(KernelOptions {
        kernels: KernelChoice::Portable,
        f16: false,
    });
    let second = load(F16);
    let offered = KernelPlan::for_device(&device, F16).unwrap();
    if all_kernels() {
        assert!(
            offered.f16 && offered.software,
            "{}: the second model must differ in f16 and thread shape",
            describe_device(&device, offered)
        );
    }
    assert_eq!(portable.kernel_plan(), KernelPlan::PORTABLE);
    assert_eq!(second.kernel_plan(), offered);
    // Caches made after the second load: each model's own type.
    assert_eq!(portable.new_cache().dtype(), DType::F32);
    assert_eq!(second.new_cache().dtype(), offered.kv_cache_dtype());
    // The first model still computes transformers' logits to f32 accuracy.
    for case in reference("phi-80").cases {
        let logits = common::next_logits(&portable, &case.ids);
        let diff = max_abs_diff(&logits, &case.last_logits);
        assert!(diff <= 1e-4, "ids={}: {diff}", case.ids.len());
    }
    // A choice the adapter cannot run is refused, naming the option.
    if !phi2_web::backend::adapter_subgroups(&device) {
        let subgroups = KernelOptions {
            kernels: KernelChoice::Subgroups,
            f16: false,
        };
        let err = load_dir(&fixture("phi-80"), &device, subgroups)
            .err()
            .expect("subgroup kernels without the feature")
            .to_string();
        assert!(
            err.contains("kernels") && err.contains("subgroups"),
            "{err}"
        );
    }
}
