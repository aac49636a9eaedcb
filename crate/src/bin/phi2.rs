//! `phi2`: the native command line — generate text, answer OpenAI-style chat requests, print
//! logits, tokenize, convert, benchmark, download.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use burn::tensor::DType;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::time::Instant;

use phi2_web::chat::ChatRun;
use phi2_web::constraint::{LazyGrammars, ResponseFormat};
use phi2_web::kernels::{KernelChoice, KernelOptions};
use phi2_web::loading::load_dir;
use phi2_web::memory::MemoryNeeds;
use phi2_web::weights::bundle::{parse_manifest, MANIFEST};
use phi2_web::weights::convert::{convert_gguf, convert_hf, synthesize, Summary};
use phi2_web::{
    block_on, BackendKind, Error, PhiConfig, PhiTokenizer, Result, SamplingParams, Session, Timings,
};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(
    name = "phi2",
    version,
    about = "Phi-2 on burn: generate, inspect logits, tokenize"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt, streaming the text.
    Generate(GenerateArgs),
    /// Answer an OpenAI-style chat completion request (JSON file; `-` reads stdin): prints the
    /// `chat.completion`, or one `chat.completion.chunk` per line with `"stream": true`.
    Chat(ChatArgs),
    /// Print the logits of the last position as JSON.
    Logits(LogitsArgs),
    /// Print the token ids of a text as JSON.
    Tokenize(TokenizeArgs),
    /// Convert a Hugging Face checkpoint directory or a GGUF file into a 4-bit chunked bundle.
    Convert(ConvertArgs),
    /// Write a bundle with random weights and a model's shapes (for benchmarks).
    Synth(SynthArgs),
    /// Measure load time, time to first token, prefill and decode speed, peak memory.
    Bench(BenchArgs),
    /// Download a bundle from a URL into a directory (retries, sha256 checks, resumes).
    Download(DownloadArgs),
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The request: `{"messages": [...], "max_tokens": …, "response_format": …, …}`.
    #[arg(long)]
    request: PathBuf,
}

#[derive(Args)]
struct DownloadArgs {
    /// The bundle's folder URL (where its manifest.json is).
    #[arg(long)]
    url: String,
    /// The directory to create (must not exist). An unfinished download waits in
    /// `<out>.partial/`; running the same command again resumes it.
    #[arg(long)]
    out: PathBuf,
    /// A request that receives nothing for this long is retried (4 tries per file).
    #[arg(long, default_value_t = 30_000)]
    stall_timeout_ms: u64,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// MiB copied to measure the device's memory bandwidth.
    #[arg(long, default_value_t = 256)]
    copy_mb: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Also time each of the model's matmul shapes alone, against the copy: one token (on a
    /// GPU with 2, 4 and 8 output rows per workgroup) and the prompt's tokens (`matmuls`).
    #[arg(long)]
    matmuls: bool,
    /// Decode under this output constraint (as `response_format`, e.g. a grammar), to measure
    /// what constraining costs; `<|endoftext|>` stays masked so that every token is decoded.
    #[arg(long, value_parser = parse_response_format)]
    response_format: Option<ResponseFormat>,
}

fn parse_response_format(text: &str) -> std::result::Result<ResponseFormat, String> {
    serde_json::from_str(text).map_err(|e| format!("not a response_format: {e}"))
}

#[derive(Args)]
struct ConvertArgs {
    /// HF checkpoint directory (config.json, tokenizer.json, safetensors) or a `.gguf` file.
    #[arg(long)]
    from: PathBuf,
    /// tokenizer.json for a GGUF source (default: rebuilt from the GGUF metadata).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The bundle directory to create (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Chunk size in MiB (at most 64).
    #[arg(long, default_value_t = 32)]
    chunk_mb: u64,
}

#[derive(Args)]
struct SynthArgs {
    /// Shapes: phi-2 (the full model) or tiny.
    #[arg(long, value_parser = ["phi-2", "tiny"])]
    preset: String,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 32)]
    chunk_mb: u64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory: config.json, tokenizer.json, *.safetensors (HF layout).
    #[arg(long)]
    model: PathBuf,
    /// Where to run: cpu or wgpu.
    #[arg(long, default_value = "wgpu")]
    backend: BackendKind,
    /// Use f16 where the GPU has shader-f16: the 4-bit matmul's products and the KV cache
    /// (half its memory). Logits move by ~1e-2; greedy tokens can change.
    #[arg(long)]
    f16: bool,
    /// GPU kernels: auto (what the adapter offers), portable (a GPU's kernels reduced in
    /// workgroup memory, no subgroups), or subgroups (a GPU's kernels reduced through
    /// subgroups, also on a software adapter; needs the subgroups feature).
    #[arg(long, default_value = "auto")]
    kernels: KernelChoice,
    /// Tokens of context (prompt and output together), at most the model's: a shorter
    /// context needs a smaller KV cache.
    #[arg(long)]
    context: Option<usize>,
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed for sampling (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the text reaches this string (repeatable); it is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object {prompt_ids, generated_ids, text, stop_reason} instead of streaming.
    #[arg(long)]
    json: bool,
    /// Constrain the output, as OpenAI's `response_format`: `{"type": "json_object"}`,
    /// `{"type": "json_schema", "json_schema": {"schema": …}}` or
    /// `{"type": "grammar", "grammar": {"syntax": "lark"|"regex", "definition": …}}`.
    #[arg(long, value_parser = parse_response_format)]
    response_format: Option<ResponseFormat>,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
    prompt: Option<String>,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    ids: Option<Vec<u32>>,
}

#[derive(Args)]
struct TokenizeArgs {
    /// Model directory holding tokenizer.json.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    text: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Chat(args) => chat(args),
        Command::Logits(args) => logits(args),
        Command::Tokenize(args) => tokenize(args),
        Command::Convert(args) => convert(args),
        Command::Synth(args) => synth(args),
        Command::Bench(args) => bench(args),
        Command::Download(args) => download(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(args: &ModelArgs) -> Result<(phi2_web::Phi, PhiTokenizer)> {
    let device = block_on(args.backend.device())?;
    let options = KernelOptions {
        kernels: args.kernels,
        f16: args.f16,
    };
    let (mut model, tokenizer) = load_dir(&args.model, &device, options)?;
    if let Some(tokens) = args.context {
        model.limit_context(tokens)?;
    }
    Ok((model, tokenizer))
}

/// What a bundle's model needs of the device as loaded (`None` for a checkpoint directory).
fn memory_needs(dir: &Path, model: &phi2_web::Phi) -> Result<Option<MemoryNeeds>> {
    let path = dir.join(MANIFEST);
    if !path.is_file() {
        return Ok(None);
    }
    let manifest = parse_manifest(&read(&path)?, &path.display().to_string())?;
    let kv_cache_f16 = model.kernel_plan().kv_cache_dtype() == DType::F16;
    Ok(Some(phi2_web::memory::memory_needs(
        &manifest,
        model.context_length(),
        kv_cache_f16,
    )))
}

/// Nanoseconds since the Unix epoch: a seed, or an id, where none is given.
fn clock_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn generate(args: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed.unwrap_or_else(clock_nanos),
        stop: args.stop,
        response_format: args.response_format,
        ..SamplingParams::default()
    };
    params.validate()?;
    let (model, tokenizer) = load(&args.model)?;
    let mut session = new_session(&model, &tokenizer, &args.prompt, params)?;
    let mut stdout = std::io::stdout().lock();
    while let Some(token) = block_on(session.next(&model, &tokenizer))? {
        if !args.json {
            write!(stdout, "{}", token.text)
                .and_then(|()| stdout.flush())
                .map_err(|e| Error::io("stdout", e))?;
        }
    }
    let out = if args.json {
        json!({
            "prompt_ids": session.prompt_ids(),
            "generated_ids": session.generated_ids(),
            "text": session.text(),
            "stop_reason": session.stop_reason().map(|r| r.as_str()),
        })
        .to_string()
    } else {
        String::new()
    };
    writeln!(stdout, "{out}").map_err(|e| Error::io("stdout", e))
}

/// A generation of `prompt` from an empty cache.
fn new_session(
    model: &phi2_web::Phi,
    tokenizer: &PhiTokenizer,
    prompt: &str,
    params: SamplingParams,
) -> Result<Session> {
    let prompt_ids = tokenizer.encode(prompt)?;
    let mut grammars = LazyGrammars::default();
    Session::start(
        model,
        tokenizer,
        &mut grammars,
        &mut None,
        prompt_ids,
        params,
    )
}

fn chat(args: ChatArgs) -> Result<()> {
    let text = match args.request.to_str() {
        Some("-") => {
            std::io::read_to_string(std::io::stdin()).map_err(|e| Error::io("stdin", e))?
        }
        _ => String::from_utf8(read(&args.request)?)
            .map_err(|e| Error::io(args.request.display().to_string(), e))?,
    };
    let request: Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(args.request.display().to_string(), format!("not JSON: {e}")))?;
    let nanos = clock_nanos();
    let id = format!("chatcmpl-{nanos:x}");
    let start = ChatRun::start(&request, id, nanos / 1_000_000_000, nanos)?;
    let (model, tokenizer) = load(&args.model)?;
    let mut run = start.run;
    let mut session = new_session(&model, &tokenizer, &start.prompt, start.params)?;
    let clock = Instant::now();
    let mut timings = Timings::start(0.0);
    let mut stdout = std::io::stdout().lock();
    let mut print = |value: &Value| writeln!(stdout, "{value}").map_err(|e| Error::io("stdout", e));
    while let Some(token) = block_on(session.next(&model, &tokenizer))? {
        timings.token(clock.elapsed().as_secs_f64() * 1000.0);
        let chunk = run.delta(&token.text);
        if let Some(chunk) = chunk.filter(|_| run.is_streamed()) {
            print(&chunk)?;
        }
    }
    let stats = timings.stats(&session);
    if run.is_streamed() {
        for chunk in run.finish_chunks(&stats) {
            print(&chunk)?;
        }
        Ok(())
    } else {
        print(&run.completion(&stats))
    }
}

fn logits(args: LogitsArgs) -> Result<()> {
    let (model, tokenizer) = load(&args.model)?;
    let ids = match (&args.ids, &args.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(prompt)) => tokenizer.encode(prompt)?,
        (None, None) => unreachable!("clap requires --prompt or --ids"),
    };
    let mut session = Session::new(&model, ids.clone(), SamplingParams::default())?;
    let logits = block_on(session.logits(&model))?;
    println!("{}", json!({ "ids": ids, "last_logits": logits }));
    Ok(())
}

fn tokenize(args: TokenizeArgs) -> Result<()> {
    let path = args.model.join("tokenizer.json");
    let bytes = read(&path)?;
    let tokenizer = PhiTokenizer::from_bytes(&bytes, &path.display().to_string())?;
    println!("{}", json!(tokenizer.encode(&args.text)?));
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path.display().to_string(), e))
}

/// Phi-2's tokenizer (scripts/build_tokenizer.py), for synthetic bundles.
const PHI2_TOKENIZER: &[u8] = include_bytes!("../../assets/tokenizer.json");

fn report(summary: &Summary, started: Instant) {
    eprintln!(
        "wrote {:.1} MB in {} chunks: {} parameters, {:.2} bits/weight, {:.1} s",
        summary.bytes as f64 / 1e6,
        summary.chunks,
        summary.parameters,
        summary.bits_per_weight,
        started.elapsed().as_secs_f64()
    );
}

/// Runs a bundle writer with a progress bar over its tensors (drawn only on a terminal).
fn with_progress<T>(write: impl FnOnce(&mut dyn FnMut(usize, usize)) -> Result<T>) -> Result<T> {
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} tensors  {elapsed} elapsed, {eta} left")
            .expect("a valid template"),
    );
    let result = write(&mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    result
}

fn convert(args: ConvertArgs) -> Result<()> {
    let started = Instant::now();
    let chunk = args.chunk_mb << 20;
    let summary = with_progress(|progress| {
        if args.from.is_file() {
            convert_gguf(
                &args.from,
                args.tokenizer.as_deref(),
                &args.out,
                chunk,
                progress,
            )
        } else {
            convert_hf(&args.from, &args.out, chunk, progress)
        }
    })?;
    report(&summary, started);
    Ok(())
}

fn synth(args: SynthArgs) -> Result<()> {
    let config = match args.preset.as_str() {
        "phi-2" => PhiConfig::phi2(),
        _ => PhiConfig {
            vocab_size: 51200,
            hidden_size: 64,
            intermediate_size: 256,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            ..PhiConfig::phi2()
        },
    };
    let started = Instant::now();
    let summary = with_progress(|progress| {
        synthesize(
            &config,
            PHI2_TOKENIZER,
            &args.out,
            args.chunk_mb << 20,
            args.seed,
            progress,
        )
    })?;
    report(&summary, started);
    Ok(())
}

fn download(args: DownloadArgs) -> Result<()> {
    use phi2_web::weights::download::{download_bundle, DownloadOptions};
    let started = Instant::now();
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} chunks {elapsed}")
            .expect("a valid template"),
    );
    let options = DownloadOptions {
        stall: std::time::Duration::from_millis(args.stall_timeout_ms.max(1)),
        ..DownloadOptions::default()
    };
    let done = download_bundle(&args.url, &args.out, options, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let done = done?;
    eprintln!(
        "{}: {} chunks ({} kept from an earlier try), {:.1} MB fetched in {:.1} s",
        args.out.display(),
        done.chunks,
        done.resumed_chunks,
        done.fetched_bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Peak resident memory of this process so far (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn bench(args: BenchArgs) -> Result<()> {
    let started = Instant::now();
    let (model, tokenizer) = load(&args.model)?;
    let load_s = started.elapsed().as_secs_f64();
    let load_peak_rss = peak_rss();
    let clock = Instant::now();
    let now_ms = || clock.elapsed().as_secs_f64() * 1000.0;
    let report = block_on(phi2_web::bench::run(
        &model,
        &tokenizer,
        args.prompt_tokens,
        args.gen_tokens,
        args.copy_mb << 20,
        args.response_format,
        &now_ms,
    ))?;
    let matmuls = match args.matmuls {
        true => Some(block_on(phi2_web::bench::matmul_figures(
            &model,
            args.prompt_tokens,
            report.copy_gb_per_s,
            &now_ms,
        ))?),
        false => None,
    };
    let mut report = serde_json::to_value(report).expect("JSON");
    let extra = json!({
        "backend": args.model.backend.name(),
        "model": args.model.model.display().to_string(),
        "loadS": load_s,
        "loadPeakRssBytes": load_peak_rss,
        "peakRssBytes": peak_rss(),
        "memoryNeeds": memory_needs(&args.model.model, &model)?,
        "matmuls": matmuls,
    });
    report
        .as_object_mut()
        .expect("an object")
        .extend(extra.as_object().expect("an object").clone());
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
    }
    Ok(())
}
