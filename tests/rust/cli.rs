//! The `phi2` command line: outputs against the transformers references, and bad input giving
//! a message and a non-zero exit rather than a panic.

mod common;

use std::process::{Command, Output};

use common::{fixture, max_abs_diff, reference, Scratch};
use serde_json::Value;

fn phi2(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phi2"))
        .args(args)
        .output()
        .expect("run phi2")
}

fn json_stdout(args: &[&str]) -> Value {
    success_json(phi2(args), args)
}

/// The JSON a successful run of `phi2 {args}` printed.
fn success_json(out: Output, args: &[&str]) -> Value {
    assert!(
        out.status.success(),
        "phi2 {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = phi2(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "phi2 {args:?}: {stderr}");
    assert!(
        !stderr.contains("panicked"),
        "phi2 {args:?} panicked: {stderr}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "phi2 {args:?}: `{needle}` not in {stderr}"
        );
    }
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// `phi2 generate --json`, greedy, for `max` tokens on the phi-tok fixture, with `run_on`
/// (backend and kernel options).
fn greedy_on_phi_tok(prompt: &str, max: usize, run_on: &[&str]) -> Value {
    success_json(run_greedy_on_phi_tok(prompt, max, run_on), run_on)
}

fn run_greedy_on_phi_tok(prompt: &str, max: usize, run_on: &[&str]) -> Output {
    let model = fixture("phi-tok");
    let max = max.to_string();
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-tokens",
        &max,
        "--temperature",
        "0",
        "--json",
    ];
    args.extend_from_slice(run_on);
    phi2(&args)
}

#[test]
fn generate_json_matches_transformers_greedy() {
    for case in reference("phi-tok").cases {
        let prompt = case.prompt.expect("phi-tok cases have prompts");
        let out = greedy_on_phi_tok(&prompt, case.greedy_ids.len(), &["--backend", "cpu"]);
        assert_eq!(ids(&out["prompt_ids"]), case.ids);
        assert_eq!(ids(&out["generated_ids"]), case.greedy_ids);
        assert_eq!(out["stop_reason"], "length");
        assert!(out["text"].is_string());
    }
}

/// Every `--kernels` choice gives transformers' greedy tokens on the GPU backend, or, for
/// `subgroups` on an adapter without them, a clear error before any work. scripts/test.sh runs
/// this on both kinds: the main suite's GL adapter has no subgroups; with
/// `PHI2_TEST_ALL_KERNELS=1` it runs on lavapipe, which has them, and `subgroups` must run.
#[test]
fn every_kernel_choice_matches_transformers_greedy_on_the_gpu() {
    let case = &reference("phi-tok").cases[0];
    let prompt = case.prompt.as_deref().expect("phi-tok cases have prompts");
    for kernels in ["auto", "portable"] {
        let run_on = ["--backend", "wgpu", "--kernels", kernels];
        let out = greedy_on_phi_tok(prompt, case.greedy_ids.len(), &run_on);
        assert_eq!(
            ids(&out["generated_ids"]),
            case.greedy_ids,
            "--kernels {kernels}"
        );
    }
    let generate_with = |kernels| {
        let run_on = ["--backend", "wgpu", "--kernels", kernels];
        run_greedy_on_phi_tok(prompt, case.greedy_ids.len(), &run_on)
    };
    let out = generate_with("subgroups");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if std::env::var("PHI2_TEST_ALL_KERNELS").is_ok_and(|v| v == "1") || out.status.success() {
        assert!(out.status.success(), "--kernels subgroups: {stderr}");
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ids(&json["generated_ids"]), case.greedy_ids);
    } else {
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("`kernels`")
                && stderr.contains("lacks")
                && stderr.contains("adapter (`"),
            "the error names the option and what the adapter lacks: {stderr}"
        );
    }
    // An unknown choice is a usage error (clap's exit code 2) naming the option and the value.
    let out = generate_with("fast");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`kernels`") && stderr.contains("fast"),
        "{stderr}"
    );
}

/// `phi2 chat` on the CPU with the request in `request` (a file).
fn chat_args<'a>(model: &'a str, request: &'a str) -> [&'a str; 7] {
    [
        "chat",
        "--model",
        model,
        "--backend",
        "cpu",
        "--request",
        request,
    ]
}

/// `phi2 chat`: an OpenAI chat completion, or its chunks one per line when streamed; the
/// answer is the greedy continuation of the Phi-2 prompt the messages make, as `generate`
/// gives it; a constrained answer parses.
#[test]
fn chat_prints_openai_shaped_completions_and_chunks() {
    let scratch = Scratch::new("cli-chat");
    std::fs::create_dir_all(&scratch).unwrap();
    let model = fixture("phi-tok");
    let model = model.to_str().unwrap();
    let request_file = |name: &str, request: Value| {
        let path = scratch.join(name);
        std::fs::write(&path, request.to_string()).unwrap();
        path.to_str().unwrap().to_string()
    };
    let messages = serde_json::json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is a prime?"}
    ]);
    let plain = request_file(
        "plain.json",
        serde_json::json!({"messages": messages, "max_tokens": 6, "stop": ["zzz"]}),
    );
    let completion = json_stdout(&chat_args(model, &plain));
    assert_eq!(completion["object"], "chat.completion");
    assert!(completion["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &completion["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "length");
    let usage = &completion["usage"];
    assert_eq!(usage["completion_tokens"], 6);
    let greedy = greedy_on_phi_tok(
        "Be brief.\nInstruct: What is a prime?\nOutput:",
        6,
        &["--backend", "cpu"],
    );
    assert_eq!(usage["prompt_tokens"], ids(&greedy["prompt_ids"]).len());
    assert_eq!(
        choice["message"]["content"].as_str().unwrap(),
        greedy["text"].as_str().unwrap().trim_start()
    );

    let streamed = request_file(
        "stream.json",
        serde_json::json!({"messages": messages, "max_tokens": 6, "stream": true,
            "stream_options": {"include_usage": true}, "stop": ["zzz"]}),
    );
    let args = chat_args(model, &streamed);
    let out = phi2(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chunks: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, choice["message"]["content"].as_str().unwrap());
    let [.., last, usage_chunk] = chunks.as_slice() else {
        panic!("too few chunks: {chunks:?}")
    };
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(usage_chunk["choices"], serde_json::json!([]));
    assert_eq!(usage_chunk["usage"], completion["usage"]);

    let constrained = request_file(
        "json.json",
        serde_json::json!({"messages": messages, "max_tokens": 60, "temperature": 0.8, "seed": 3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema":
                {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["n"],
                 "additionalProperties": false}}}}),
    );
    let completion = json_stdout(&chat_args(model, &constrained));
    let content = completion["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    let value: Value = serde_json::from_str(content).unwrap();
    assert!(value["n"].is_i64(), "{content}");
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");

    let bad = request_file(
        "bad.json",
        serde_json::json!({"messages": messages, "tools": []}),
    );
    fails_with(
        &chat_args(model, &bad),
        &["option `tools`", "not supported"],
    );
}

#[test]
fn logits_by_ids_match_transformers() {
    let case = &reference("phi-80").cases[0];
    let ids_arg: Vec<String> = case.ids.iter().map(u32::to_string).collect();
    let model = fixture("phi-80");
    let out = json_stdout(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--ids",
        &ids_arg.join(","),
        "--backend",
        "cpu",
    ]);
    assert_eq!(ids(&out["ids"]), case.ids);
    let logits: Vec<f32> = out["last_logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert!(max_abs_diff(&logits, &case.last_logits) <= 1e-4);
}

#[test]
fn tokenize_prints_ids() {
    let model = fixture("phi-tok");
    let out = json_stdout(&[
        "tokenize",
        "--model",
        model.to_str().unwrap(),
        "--text",
        "a  b",
    ]);
    assert_eq!(ids(&out), vec![64, 50286, 65]);
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let model = fixture("phi-tok");
    let run = |seed: &str| {
        json_stdout(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "Hello",
            "--max-tokens",
            "12",
            "--temperature",
            "1.5",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--repetition-penalty",
            "1.1",
            "--seed",
            seed,
            "--backend",
            "cpu",
            "--json",
        ])["generated_ids"]
            .clone()
    };
    assert_eq!(run("7"), run("7"));
    assert_ne!(run("7"), run("8"));
}

#[test]
fn bad_input_gives_a_message_and_exit_code_1() {
    let model = fixture("phi-tok");
    let model = model.to_str().unwrap();
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "Hi",
            "--backend",
            "cpu",
        ];
        args.extend_from_slice(extra);
        args.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let check = |args: Vec<String>, needles: &[&str]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&args, needles)
    };
    check(gen(&["--temperature", "-1"]), &["temperature"]);
    check(gen(&["--top-p", "0"]), &["top_p"]);
    check(gen(&["--top-p", "1.5"]), &["top_p"]);
    check(gen(&["--top-k", "0"]), &["top_k"]);
    fails_with(
        &[
            "generate",
            "--model",
            "/nonexistent/dir",
            "--prompt",
            "x",
            "--backend",
            "cpu",
        ],
        &["/nonexistent/dir"],
    );
    fails_with(
        &[
            "generate",
            "--model",
            fixture("phi-qkln").to_str().unwrap(),
            "--prompt",
            "x",
            "--backend",
            "cpu",
        ],
        &["qk_layernorm"],
    );
    // phi-tok's context is max_position_embeddings tokens; " a" is one token each.
    let context = 2048;
    let long_prompt = " a".repeat(context + 5);
    fails_with(
        &[
            "generate",
            "--model",
            model,
            "--prompt",
            &long_prompt,
            "--backend",
            "cpu",
        ],
        &["2053", &context.to_string()],
    );
}

#[test]
fn synth_and_bench_smoke_run() {
    let out = Scratch::new("synth");
    let status = phi2(&["synth", "--preset", "tiny", "--out", out.to_str().unwrap()]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    // Both backends: the GPU one counts kernel launches, the CPU one launches none.
    for backend in ["cpu", "wgpu"] {
        let report = json_stdout(&[
            "bench",
            "--model",
            out.to_str().unwrap(),
            "--backend",
            backend,
            "--prompt-tokens",
            "16",
            "--gen-tokens",
            "4",
            "--copy-mb",
            "4",
            "--json",
        ]);
        for field in [
            "loadS",
            "timeToFirstTokenS",
            "prefillTokensPerS",
            "decodeTokensPerS",
            "decodeEffectiveGbPerS",
            "copyGbPerS",
            "bandwidthRatio",
        ] {
            assert!(
                report[field].as_f64().is_some_and(|v| v > 0.0),
                "{field} in {report}"
            );
        }
        assert_eq!(report["generatedTokens"], 4, "{report}");
        assert_eq!(report["promptTokens"], 16, "{report}");
        assert_eq!(report["copyBytes"], 4 << 20, "{report}");
        assert!(report["peakRssBytes"].as_u64().is_some_and(|v| v > 0));
        let launches = report["launchesPerToken"].as_f64().unwrap();
        let figure = |field: &str| report[field].as_f64();
        let ratio = figure("prefillTokensPerS").unwrap() / figure("decodeTokensPerS").unwrap();
        assert!(
            (figure("prefillDecodeRatio").unwrap() / ratio - 1.0).abs() < 1e-9,
            "{report}"
        );
        assert!(
            figure("prefillGmacPerS").is_some_and(|v| v > 0.0),
            "{report}"
        );
        if backend == "cpu" {
            assert_eq!(launches, 0.0, "{report}");
            // The CPU backend's matmul is host code: no kernel to measure a ceiling with.
            for field in ["peakGmacPerS", "prefillPeakShare", "prefillDecodeCeiling"] {
                assert!(report[field].is_null(), "{field} in {report}");
            }
        } else {
            assert!(launches >= 1.0, "{report}");
            // A prefill cannot multiply-add faster than registers alone.
            let share = figure("prefillPeakShare").unwrap();
            assert!(share > 0.0 && share < 1.0, "{report}");
            assert!(figure("peakGmacPerS").is_some_and(|v| v > 0.0), "{report}");
            // The ceiling is the ratio a prefill at the peak rate would have.
            let ceiling = figure("prefillDecodeCeiling").unwrap();
            assert!((ceiling * share / ratio - 1.0).abs() < 1e-9, "{report}");
        }
    }
    // A GPU's kernels: three launches per layer (the LayerNorm inside the first matmul,
    // attention, the second matmul), then the embedding lookup, lm_head (the final LayerNorm
    // inside) and the greedy pick; and `--matmuls` times each shape with each decode shape.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let layers = manifest["config"]["num_hidden_layers"].as_u64().unwrap();
    let report = json_stdout(&[
        "bench",
        "--model",
        out.to_str().unwrap(),
        "--backend",
        "wgpu",
        "--kernels",
        "portable",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "3",
        "--copy-mb",
        "4",
        "--matmuls",
        "--json",
    ]);
    assert_eq!(
        report["launchesPerToken"].as_f64(),
        Some((3 * layers + 3) as f64),
        "{}",
        report["launchesByKernel"]
    );
    let matmuls = report["matmuls"].as_array().expect("matmul figures");
    let names: Vec<&str> = matmuls
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [["fc1_qkv"; 4], ["fc2_dense"; 4], ["lm_head"; 4]].concat()
    );
    for figure in matmuls {
        assert!(
            figure["copyShare"].as_f64().is_some_and(|v| v > 0.0),
            "{figure}"
        );
        let decode_rows = figure["decodeRows"].as_u64();
        match figure["tokens"].as_u64() {
            Some(1) => assert!(matches!(decode_rows, Some(2 | 4 | 8)), "{figure}"),
            tokens => assert_eq!((tokens, decode_rows), (Some(8), None), "{figure}"),
        }
    }
    // One generated token leaves no decode speed: the ratios to it are missing, not infinite.
    let report = json_stdout(&[
        "bench",
        "--model",
        out.to_str().unwrap(),
        "--backend",
        "cpu",
        "--prompt-tokens",
        "4",
        "--gen-tokens",
        "1",
        "--copy-mb",
        "1",
        "--json",
    ]);
    assert_eq!(report["decodeTokensPerS"], 0.0, "{report}");
    assert!(report["prefillDecodeRatio"].is_null(), "{report}");
}

#[test]
fn a_full_disk_during_convert_fails_cleanly() {
    let out = Scratch::new("full-disk");
    let partial = format!("{}.partial", out.display());
    // `ulimit -f` caps every file the converter writes at 256 KiB: the first 1 MiB chunk fails
    // part-way as on a full disk (EFBIG; SIGXFSZ ignored so that the write reports it).
    let script =
        r#"ulimit -f 256; trap '' XFSZ; exec "$0" convert --from "$1" --out "$2" --chunk-mb 1"#;
    let output = Command::new("bash")
        .args(["-c", script, env!("CARGO_BIN_EXE_phi2")])
        .arg(fixture("phi-tok"))
        .arg(&*out)
        .output()
        .expect("run bash");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("chunk-00000.bin") && stderr.contains("File too large"),
        "the error must name the file and the cause: {stderr}"
    );
    assert!(!out.exists(), "a bundle directory was left behind");
    assert!(
        !std::path::Path::new(&partial).exists(),
        "the partial directory was left behind"
    );
}
