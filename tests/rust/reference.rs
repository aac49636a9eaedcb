//! The model against Hugging Face transformers: logits, incremental decode, greedy ids,
//! on the CPU and wgpu backends, for every fixture.

mod common;

use common::{load, max_abs_diff, reference, BACKENDS};
use phi2_web::{block_on, BackendKind, SamplingParams, Session};

const FIXTURES: [&str; 4] = ["phi-tok", "phi-80", "phi-80-old", "phi-odd"];
const LOGIT_TOLERANCE: f32 = 1e-4;

fn last_logits(fixture: &str, backend: BackendKind) {
    let (model, _) = load(fixture, backend);
    for case in reference(fixture).cases {
        let mut session =
            Session::new(&model, case.ids.clone(), SamplingParams::default()).unwrap();
        let logits = block_on(session.logits(&model)).unwrap();
        let diff = max_abs_diff(&logits, &case.last_logits);
        eprintln!(
            "{fixture} {backend:?} ids={}: max |Δlogit| = {diff:.2e}",
            case.ids.len()
        );
        assert!(
            diff <= LOGIT_TOLERANCE,
            "{fixture} on {backend:?}: {diff} > {LOGIT_TOLERANCE}"
        );
    }
}

fn greedy(fixture: &str, backend: BackendKind) {
    let (model, tokenizer) = load(fixture, backend);
    for case in reference(fixture).cases {
        let params = SamplingParams {
            max_tokens: case.greedy_ids.len(),
            ..SamplingParams::default()
        };
        let mut session = Session::new(&model, case.ids.clone(), params).unwrap();
        while block_on(session.next(&model, &tokenizer))
            .unwrap()
            .is_some()
        {}
        assert_eq!(
            session.generated_ids(),
            case.greedy_ids,
            "{fixture} on {backend:?}"
        );
    }
}

/// Feeding tokens one at a time through the KV cache gives the logits of one full pass.
fn incremental_equals_full(fixture: &str, backend: BackendKind) {
    let (model, _) = load(fixture, backend);
    let case = reference(fixture)
        .cases
        .into_iter()
        .max_by_key(|c| c.ids.len())
        .unwrap();
    let ids = case.ids;
    assert!(ids.len() >= 3, "needs a multi-token case");
    let full = {
        let mut cache = model.new_cache();
        let logits = model.forward(&ids, &mut cache);
        block_on(logits.into_data_async())
            .unwrap()
            .try_into_vec::<f32>()
            .unwrap()
    };
    let mut cache = model.new_cache();
    let split = ids.len() / 2;
    let mut logits = model.forward(&ids[..split], &mut cache);
    for &id in &ids[split..] {
        logits = model.forward(&[id], &mut cache);
    }
    assert_eq!(cache.len(), ids.len());
    let incremental = block_on(logits.into_data_async())
        .unwrap()
        .try_into_vec::<f32>()
        .unwrap();
    let diff = max_abs_diff(&full, &incremental);
    assert!(
        diff <= 1e-4,
        "{fixture} on {backend:?}: incremental differs by {diff}"
    );
    // And both match transformers.
    assert!(max_abs_diff(&full, &case.last_logits) <= LOGIT_TOLERANCE);
}

macro_rules! per_fixture_and_backend {
    ($($test:ident => $check:ident,)*) => {$(
        #[test]
        fn $test() {
            for backend in BACKENDS {
                for fixture in FIXTURES {
                    $check(fixture, backend);
                }
            }
        }
    )*};
}

per_fixture_and_backend! {
    logits_match_transformers => last_logits,
    greedy_ids_match_transformers => greedy,
    kv_cache_decode_matches_full_forward => incremental_equals_full,
}
