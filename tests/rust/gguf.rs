//! GGUF import against gguf-py (scripts/make_gguf_fixtures.py): every block type dequantizes
//! bit for bit as gguf-py does, Q4_0 carries into bundles losslessly, HF → bundle and
//! GGUF → bundle of the same weights agree, and the 4-bit model computes what transformers
//! computes on gguf-py's dequantized weights.

mod common;

use std::path::PathBuf;

use common::{fixture, greedy_ids, max_abs_diff, next_logits, Reference, Scratch, BACKENDS};
use phi2_web::kernels::KernelOptions;
use phi2_web::loading::load_dir;
use phi2_web::weights::bundle::{decode, sha256_hex, ChunkStream, Manifest, TensorBytes, MANIFEST};
use phi2_web::weights::convert::{convert_gguf, convert_hf};
use phi2_web::weights::gguf::Gguf;
use phi2_web::{block_on, BackendKind, PhiTokenizer, SamplingParams, Session};
use serde_json::Value;

fn gguf_path(name: &str) -> PathBuf {
    fixture("gguf").join(name)
}

fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(gguf_path(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn f32_sha(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    sha256_hex(&bytes)
}

/// Every tensor of `file` dequantizes to exactly gguf-py's values.
fn check_bit_exact(file: &str, reference_file: &str) {
    let bytes = std::fs::read(gguf_path(file)).unwrap();
    let gguf = Gguf::parse(&bytes, file).unwrap();
    let reference = reference(reference_file);
    let expected = reference["tensors"].as_array().unwrap();
    assert_eq!(gguf.tensors.len(), expected.len());
    for entry in expected {
        let name = entry["name"].as_str().unwrap();
        let tensor = gguf
            .tensor(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        let shape: Vec<usize> = serde_json::from_value(entry["shape_out_in"].clone()).unwrap();
        assert_eq!(tensor.shape, shape, "{name}");
        let values = gguf.dequantize(tensor);
        assert_eq!(
            f32_sha(&values),
            entry["sha256_f32le"],
            "{name} ({})",
            entry["ggml_type"]
        );
    }
}

#[test]
fn every_block_type_dequantizes_like_gguf_py() {
    check_bit_exact("kquants.gguf", "kquants.reference.json");
    check_bit_exact("phi-80-q4_0.gguf", "phi-80-q4_0.reference.json");
}

#[test]
fn another_architecture_is_refused_by_name() {
    let err = convert_gguf(
        &gguf_path("kquants.gguf"),
        None,
        &Scratch::new("gguf-arch"),
        1 << 20,
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("general.architecture") && err.contains("kquant-test"),
        "{err}"
    );
}

/// The bundle's tensors as stored (little-endian words), by name.
fn bundle_tensors(dir: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    let manifest = Manifest::parse(&std::fs::read_to_string(dir.join(MANIFEST)).unwrap()).unwrap();
    let mut stream = ChunkStream::new(manifest.clone());
    let mut out = Vec::new();
    for (i, chunk) in manifest.chunks.iter().enumerate() {
        let bytes = std::fs::read(dir.join(&chunk.file)).unwrap();
        stream
            .push(i, &bytes, None, &chunk.file, |entry, words| {
                out.push((entry.name.clone(), words));
                Ok(())
            })
            .unwrap();
    }
    out
}

#[test]
fn q4_0_carries_over_losslessly_and_agrees_with_the_hf_conversion() {
    let from_gguf = Scratch::new("gguf-from-gguf");
    convert_gguf(
        &gguf_path("phi-80-q4_0.gguf"),
        None,
        &from_gguf,
        1 << 20,
        |_, _| {},
    )
    .unwrap();
    let from_hf = Scratch::new("gguf-from-hf");
    convert_hf(&fixture("phi-80"), &from_hf, 1 << 20, |_, _| {}).unwrap();

    // lm_head is Q4_0 in the GGUF: the bundle holds the same values bit for bit.
    let reference = reference("phi-80-q4_0.reference.json");
    let output = reference["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "output.weight")
        .unwrap();
    let gguf_tensors = bundle_tensors(&from_gguf);
    let manifest =
        Manifest::parse(&std::fs::read_to_string(from_gguf.join(MANIFEST)).unwrap()).unwrap();
    let entry = manifest
        .tensors
        .iter()
        .find(|t| t.name == "lm_head.weight")
        .unwrap();
    let words = gguf_tensors
        .iter()
        .find(|(n, _)| n == "lm_head.weight")
        .unwrap()
        .1
        .clone();
    let TensorBytes::Q4(matrix) = decode(entry, words) else {
        panic!("lm_head is q4")
    };
    assert_eq!(f32_sha(&matrix.dequantize()), output["sha256_f32le"]);

    // Quantizing the f32 checkpoint here gives the same bytes as ggml's Q4_0 did, for every
    // tensor but the embedding (Q8_0 in the GGUF, requantized).
    let hf_tensors = bundle_tensors(&from_hf);
    assert_eq!(hf_tensors.len(), gguf_tensors.len());
    for ((name_hf, hf), (name_gguf, gguf)) in hf_tensors.iter().zip(&gguf_tensors) {
        assert_eq!(name_hf, name_gguf);
        if name_hf != "model.embed_tokens.weight" {
            assert!(
                hf == gguf,
                "{name_hf} differs between the HF and GGUF conversions"
            );
        }
    }
    // And the two bundles compute nearly the same logits (they differ only by the embedding's
    // extra Q8_0 rounding before its 4-bit quantization).
    let device = block_on(BackendKind::Cpu.device()).unwrap();
    let ids = vec![5u32, 900, 17, 3, 250, 1000, 42];
    let logits = |dir: &std::path::Path| {
        let (model, _) = load_dir(dir, &device, KernelOptions::default()).unwrap();
        let mut session = Session::new(&model, ids.clone(), SamplingParams::default()).unwrap();
        block_on(session.logits(&model)).unwrap()
    };
    let (a, b) = (logits(&from_gguf), logits(&from_hf));
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = max_abs_diff(&a, &b);
    eprintln!("HF vs GGUF bundle logits: max |Δ| {diff} of max |logit| {scale}");
    assert!(
        diff < 0.05 * scale,
        "HF and GGUF bundles differ by {diff} (logits up to {scale})"
    );
}

/// The 4-bit bundle converted from the GGUF computes what transformers computes on gguf-py's
/// dequantized weights (`make_gguf_fixtures.py --logits`; the Q8_0 embedding requantized to
/// Q4_0 there as the converter does): logits and greedy ids, on both backends.
#[test]
fn q4_model_matches_transformers_on_dequantized_weights() {
    const TOLERANCE: f32 = 1e-3;
    let text = std::fs::read_to_string(gguf_path("phi-80-q4_0.logits.json")).unwrap();
    let expected: Reference = serde_json::from_str(&text).unwrap();
    let dir = Scratch::new("gguf-q4-logits");
    convert_gguf(
        &gguf_path("phi-80-q4_0.gguf"),
        None,
        &dir,
        1 << 20,
        |_, _| {},
    )
    .unwrap();
    for backend in BACKENDS {
        let device = block_on(backend.device()).unwrap();
        let (model, tokenizer) = load_dir(&dir, &device, KernelOptions::default()).unwrap();
        for case in &expected.cases {
            let diff = max_abs_diff(&next_logits(&model, &case.ids), &case.last_logits);
            eprintln!(
                "q4 {backend:?} ids={}: max |Δlogit| vs transformers = {diff:.2e}",
                case.ids.len()
            );
            assert!(diff <= TOLERANCE, "{backend:?}: {diff} > {TOLERANCE}");

            assert_eq!(
                greedy_ids(&model, &tokenizer, &case.ids, case.greedy_ids.len()),
                case.greedy_ids,
                "{backend:?} ids={}",
                case.ids.len()
            );
        }
    }
}

/// Phi-2's `tokenizer.json` (scripts/build_tokenizer.py), from which the GGUF fixtures' token
/// lists were written.
fn hf_tokenizer() -> PhiTokenizer {
    let file = fixture("phi-tok").join("tokenizer.json");
    PhiTokenizer::from_bytes(&std::fs::read(&file).unwrap(), &file.display().to_string()).unwrap()
}

fn rebuilt_tokenizer(file: &str) -> PhiTokenizer {
    let bytes = std::fs::read(gguf_path(file)).unwrap();
    let gguf = Gguf::parse(&bytes, file).unwrap();
    PhiTokenizer::from_bytes(&gguf.tokenizer_json().unwrap(), file)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// Texts that reach every kind of token Phi-2 has: each run of 1..=40 spaces and of tabs at a
/// line start (the whitespace-run tokens 50257..50294), indented Python, `<|endoftext|>` inside
/// text, non-ASCII text and emoji.
fn tokenizer_corpus() -> Vec<String> {
    let mut corpus = Vec::new();
    for run in 1..=40 {
        for unit in [" ", "\t"] {
            corpus.push(format!("x\n{}y", unit.repeat(run)));
            corpus.push(format!("{}return n\n", unit.repeat(run)));
        }
    }
    corpus.extend(
        [
            "def f(n):\n    return n",
            "class A:\n    def f(self):\n        if self.x:\n            return [\n                1,\n            ]\n",
            "def g():\n\tfor i in range(3):\n\t\tprint(i)  # two tabs\n\n\n",
            "first<|endoftext|>second <|endoftext|><|endoftext|> third",
            "Instruct: What is a prime?\nOutput:",
            "naïve café, Ünïcödé, Ελληνικά, русский, 東京, 한국어, العربية",
            "emoji 🦀👩‍💻🇺🇳 and ZWJ sequences 👨‍👩‍👧‍👦",
            "mixed \t \t  tabs\t\t\tand    spaces   at the end   ",
            "[PAD50295] is only text",
        ]
        .map(String::from),
    );
    corpus
}

#[test]
fn tokenizer_rebuilt_from_metadata_matches_tokenizer_json() {
    let original = hf_tokenizer();
    let corpus = tokenizer_corpus();
    // phi-80-q4_0.gguf lists the 50 295 tokens; phi-2-vocab.gguf pads them to 51 200 rows as
    // llama.cpp does for microsoft/phi-2.
    for file in ["phi-80-q4_0.gguf", "phi-2-vocab.gguf"] {
        let rebuilt = rebuilt_tokenizer(file);
        for text in &corpus {
            let ids = original.encode(text).unwrap();
            assert_eq!(rebuilt.encode(text).unwrap(), ids, "{file}: {text:?}");
            assert_eq!(rebuilt.decode(&ids).unwrap(), *text, "{file}: {text:?}");
        }
    }
    // The example: four spaces are 50284, never a padding id.
    let ids = rebuilt_tokenizer("phi-2-vocab.gguf")
        .encode("def f(n):\n    return n")
        .unwrap();
    assert!(ids.contains(&50284), "{ids:?}");
}

#[test]
fn every_id_of_the_padded_vocabulary_decodes() {
    let original = hf_tokenizer();
    let rebuilt = rebuilt_tokenizer("phi-2-vocab.gguf");
    for id in 0..51_200u32 {
        let text = rebuilt.decode(&[id]).unwrap();
        if id < 50_295 {
            assert_eq!(text, original.decode(&[id]).unwrap(), "id {id}");
        } else {
            // Hugging Face's tokenizer has no such id and decodes it to nothing, and no text
            // may encode to it.
            assert!(text.is_empty(), "id {id}: {text:?}");
        }
    }
}

#[test]
fn damaged_gguf_files_are_errors_never_panics() {
    let good = std::fs::read(gguf_path("kquants.gguf")).unwrap();
    // Truncations at every length, and single-byte corruptions across the header.
    for len in 0..good.len() {
        let _ = Gguf::parse(&good[..len], "truncated").map(|g| {
            for t in &g.tensors {
                g.dequantize(t);
            }
        });
    }
    let mut state = 0x2545F4914F6CDD1Du64;
    for _ in 0..3000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut bytes = good.clone();
        let at = (state % 1100) as usize;
        bytes[at] = (state >> 32) as u8;
        if let Ok(g) = Gguf::parse(&bytes, "mutated") {
            for t in &g.tensors {
                g.dequantize(t);
            }
        }
    }
    let err = Gguf::parse(b"GGUF\x03\0\0\0", "short.gguf")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("short.gguf") && err.contains("tensor count"),
        "{err}"
    );
    let mut huge = good[..24].to_vec();
    huge.extend_from_slice(&(u64::MAX / 2).to_le_bytes()); // a key length no file can hold
    let err = Gguf::parse(&huge, "huge.gguf").err().unwrap().to_string();
    assert!(err.contains("huge.gguf"), "{err}");
}
