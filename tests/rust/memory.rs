//! What a model needs of its device (`memory_needs`, read from the manifest before any
//! download) against what the device's allocator really holds; a shorter context; prompts run
//! in steps. Alone in its test binary: the device's memory report covers the whole process.

mod common;

use common::{fixture, max_abs_diff, Scratch, BACKENDS};
use phi2_web::kernels::KernelOptions;
use phi2_web::loading::load_dir;
use phi2_web::memory::{device_memory, device_memory_usage, memory_needs, PREFILL_CHUNK};
use phi2_web::weights::bundle::{Manifest, MANIFEST};
use phi2_web::weights::convert::convert_hf;
use phi2_web::{block_on, BackendKind, Error, Phi, SamplingParams, Session, StopReason};

const CONTEXT: usize = 1024;

/// Held by each test that uses the GPU: one measures what the device holds.
static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn read(logits: burn::tensor::Tensor<2>) -> Vec<f32> {
    block_on(logits.into_data_async())
        .unwrap()
        .try_into_vec::<f32>()
        .unwrap()
}

fn prompt(model: &Phi, tokens: usize) -> Vec<u32> {
    let vocab = model.config().vocab_size as u32;
    (0..tokens as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect()
}

/// The largest single allocation the device's pools have served in this process.
fn largest_allocation(device: &burn::tensor::Device) -> u64 {
    device_memory(device)
        .unwrap()
        .streams
        .iter()
        .flat_map(|stream| {
            let pools = &stream.pools;
            pools
                .dynamic
                .iter()
                .chain([&pools.persistent, &pools.dedicated])
                .map(|pool| pool.largest_alloc)
                .collect::<Vec<_>>()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn the_device_holds_what_the_manifest_says_the_model_needs() {
    let bundle = Scratch::new("memory-phi-80");
    convert_hf(&fixture("phi-80"), &bundle, 1 << 20, |_, _| {}).unwrap();
    let manifest =
        Manifest::parse(&std::fs::read_to_string(bundle.join(MANIFEST)).unwrap()).unwrap();
    let needs = memory_needs(&manifest, CONTEXT, false);
    eprintln!("{needs:?}");
    let _gpu = GPU.lock().unwrap();

    let device = block_on(BackendKind::Wgpu.device()).unwrap();
    let held = || device_memory_usage(&device).unwrap().bytes_in_use;
    let before = held();
    let (mut model, _) = load_dir(&bundle, &device, KernelOptions::default()).unwrap();
    model.limit_context(CONTEXT).unwrap();
    let weights = held() - before;
    assert_eq!(weights, needs.weights_bytes, "the weights on the device");

    // A prompt filling the whole context: the cache grows to all of it, and the prompt runs in
    // steps whose buffers stay within the estimate's largest.
    let mut cache = model.new_cache();
    let logits = model.forward(&prompt(&model, CONTEXT), &mut cache);
    let _ = read(logits);
    assert_eq!(cache.capacity(), CONTEXT);
    // Beside the weights and the full cache, only a step's leftovers (far below its peak).
    let after = held() - before;
    assert!(
        (needs.weights_bytes + needs.kv_cache_bytes..=needs.total_bytes).contains(&after),
        "{after} bytes held after the prompt; {needs:?}"
    );
    let largest = largest_allocation(&device);
    assert!(
        largest <= needs.largest_buffer.bytes,
        "an allocation of {largest} bytes; the estimate's largest buffer is {:?}",
        needs.largest_buffer
    );
    let reserved = device_memory_usage(&device).unwrap().bytes_reserved;
    eprintln!(
        "estimated {} bytes in all; the device holds {reserved} (largest allocation {largest})",
        needs.total_bytes
    );
}

#[test]
fn a_prompt_run_in_steps_computes_what_it_does_at_once() {
    let _gpu = GPU.lock().unwrap();
    for backend in BACKENDS {
        let device = block_on(backend.device()).unwrap();
        let (model, _) = load_dir(&fixture("phi-80"), &device, KernelOptions::default()).unwrap();
        let ids = prompt(&model, PREFILL_CHUNK + 45);
        let at_once = read(model.forward_in_steps(&ids, ids.len(), &mut model.new_cache()));
        for step in [7, PREFILL_CHUNK] {
            let stepped = read(model.forward_in_steps(&ids, step, &mut model.new_cache()));
            let diff = max_abs_diff(&at_once, &stepped);
            assert!(diff <= 1e-4, "{backend:?}, steps of {step}: {diff}");
        }
    }
}

#[test]
fn a_shorter_context_bounds_prompt_cache_and_output() {
    let device = block_on(BackendKind::Cpu.device()).unwrap();
    let (mut model, tokenizer) =
        load_dir(&fixture("phi-80"), &device, KernelOptions::default()).unwrap();
    for bad in [0, model.config().max_position_embeddings + 1] {
        match model.limit_context(bad) {
            Err(Error::InvalidOption { option, message }) => {
                assert_eq!(option, "context_length");
                assert!(message.contains(&bad.to_string()), "{message}");
            }
            other => panic!("context {bad}: {other:?}"),
        }
    }
    model.limit_context(64).unwrap();
    assert_eq!(model.context_length(), 64);
    assert_eq!(model.new_cache().capacity(), 64);
    match Session::new(&model, prompt(&model, 65), SamplingParams::default()) {
        Err(Error::PromptTooLong {
            prompt_tokens: 65,
            context: 64,
        }) => {}
        Err(other) => panic!("a 65-token prompt: {other}"),
        Ok(_) => panic!("a 65-token prompt was accepted with a context of 64"),
    }
    let params = SamplingParams {
        max_tokens: 100,
        ..SamplingParams::default()
    };
    let mut session = Session::new(&model, prompt(&model, 60), params).unwrap();
    session.ignore_end_of_text();
    while block_on(session.next(&model, &tokenizer))
        .unwrap()
        .is_some()
    {}
    assert_eq!(session.generated_ids().len(), 4);
    assert_eq!(session.stop_reason(), Some(StopReason::Length));
}
