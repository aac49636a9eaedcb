//! The browser API (wasm-bindgen), used by the npm package's engine (`pkg/src/engine.js`).
//!
//! - `BundleLoading`: the package fetches a bundle's chunks (in parallel, from the network or
//!   Cache Storage) and pushes them here in order; each is verified and uploaded at once.
//! - `Phi2Model.load`: loads a model directory (bundle or HF checkpoint) by plain `fetch`.
//! - `Phi2Model.generate`: a JS async iterator of `{tokenId, text}`, ending with stats.
//! - `Phi2Model.chat`: an OpenAI chat completion request; an async iterator of
//!   `chat.completion.chunk`s, ending with the `chat.completion`.
//!
//! Errors are JS `Error`s whose `name` says the kind (`LoadError`, `IntegrityError`,
//! `FormatError`, `OptionError`, `DeviceError`, `StateError`) and whose `details` name the
//! file, chunk, tensor, field or option.

use std::cell::{RefCell, RefMut};
use std::collections::VecDeque;
use std::rc::Rc;

use js_sys::{Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::{future_to_promise, JsFuture};

use crate::chat::ChatRun;
use crate::constraint::{LazyGrammars, ResponseFormat};
use crate::error::{Error, Result};
use crate::generation::{GenerationStats, Timings};
use crate::kernels::{describe_device, KernelOptions};
use crate::loading::{load_model, BundleLoader, FileSource};
use crate::memory::memory_needs;
use crate::model::checked_context;
use crate::weights::bundle::parse_manifest;
use crate::{BackendKind, Phi, PhiTokenizer, SamplingParams, Session};

#[wasm_bindgen]
extern "C" {
    /// The global `fetch`, present in windows and workers alike.
    #[wasm_bindgen(js_name = fetch)]
    fn global_fetch(url: &str) -> Promise;
}

// `Symbol.asyncIterator` cannot be named from Rust; a two-line helper sets it.
#[wasm_bindgen(inline_js = "
export function asyncIterable(target) {
  target[Symbol.asyncIterator] = function () { return this; };
  return target;
}
export function nowMs() { return performance.now(); }
")]
extern "C" {
    #[wasm_bindgen(js_name = asyncIterable)]
    fn async_iterable(target: JsValue) -> JsValue;
    #[wasm_bindgen(js_name = nowMs)]
    fn now_ms() -> f64;
}

extern "C" {
    /// The static constructors, synthesised by the linker (cubecl's IR registers its
    /// operations through `inventory`, which runs as constructors).
    fn __wasm_call_ctors();
}

/// Runs the static constructors once, when the module is instantiated. Without a call of its
/// own, wasm-ld runs them again at the start of every exported function, and JS calls into
/// the module dozens of times per kernel launch (wgpu's WebGPU bindings): that cost held even
/// a 2-layer model's decoding in Chromium to a few tokens a second (BENCHMARKS.md).
/// In the `threads` build every worker of the pool starts the module too, on the same memory:
/// the constructors must still run only once.
#[wasm_bindgen(start)]
fn run_static_constructors() {
    static CONSTRUCTED: std::sync::Once = std::sync::Once::new();
    // Safety: the linker's constructor entry point, called once before any other export.
    CONSTRUCTED.call_once(|| unsafe { __wasm_call_ctors() });
}

/// `initThreadPool(threads)`: starts rayon's pool on that many Web Workers (the engine's worker
/// then waits while they compute; it must not be a page's main thread, which may not block).
#[cfg(feature = "threads")]
#[allow(unused_imports)] // exported to JS by its own #[wasm_bindgen]; this links it in
pub use wasm_bindgen_rayon::init_thread_pool;

/// A JS `Error` with the crate error's kind as `name` and what it concerns as `details`.
fn js_error(e: Error) -> JsValue {
    let error = js_sys::Error::new(&e.to_string());
    error.set_name(e.kind());
    let details = Object::new();
    for (key, value) in e.details() {
        let _ = Reflect::set(&details, &key.into(), &value.into());
    }
    let _ = Reflect::set(&error, &"details".into(), &details);
    error.into()
}

fn state_error(message: &str) -> JsValue {
    js_error(Error::State(message.to_string()))
}

fn to_js<T: serde::Serialize>(value: &T) -> JsValue {
    let json = serde_json::to_string(value).expect("plain data serializes");
    js_sys::JSON::parse(&json).expect("serde_json writes valid JSON")
}

/// Model files under a base URL.
struct HttpSource {
    base: String,
}

impl FileSource for HttpSource {
    async fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let url = self.locate(name);
        let failed = |what: &str, e: JsValue| Error::io(&url, format!("{what}: {e:?}"));
        let response: web_sys::Response = JsFuture::from(global_fetch(&url))
            .await
            .map_err(|e| failed("request failed", e))?
            .unchecked_into();
        if response.status() == 404 {
            return Ok(None);
        }
        if !response.ok() {
            return Err(Error::io(
                &url,
                format!("HTTP status {}", response.status()),
            ));
        }
        let body = response.array_buffer().map_err(|e| failed("no body", e))?;
        let body = JsFuture::from(body)
            .await
            .map_err(|e| failed("download failed", e))?;
        Ok(Some(Uint8Array::new(&body).to_vec()))
    }

    fn locate(&self, name: &str) -> String {
        format!("{}{name}", self.base)
    }
}

struct Loaded {
    model: Phi,
    tokenizer: PhiTokenizer,
    /// Output constraints' vocabulary index, made when first needed.
    grammars: LazyGrammars,
    /// The last generation: its KV cache serves the next prompt's shared start.
    session: Option<Session>,
    /// Which `Generation` owns `session`; a newer one ends the older.
    generation: u64,
}

/// `None` once unloaded.
type Engine = Rc<RefCell<Option<Loaded>>>;

/// The model for one call. Async calls keep this borrow across their awaits on purpose: it is
/// the lock that makes a second call while a step runs fail with a `StateError` (every borrow is
/// a `try_borrow_mut`, so nothing panics).
fn borrow_loaded(engine: &Engine) -> std::result::Result<RefMut<'_, Loaded>, JsValue> {
    let guard = engine.try_borrow_mut().map_err(|_| {
        state_error("the model is busy with a running step; await it before calling again")
    })?;
    RefMut::filter_map(guard, Option::as_mut)
        .map_err(|_| state_error("the model has been unloaded; load it again"))
}

fn parse_backend(backend: Option<String>) -> Result<BackendKind> {
    backend.as_deref().unwrap_or("webgpu").parse()
}

/// The model's kernel options from the JS arguments: `kernels` ("auto", the default,
/// "portable" or "subgroups": see [`crate::kernels::KernelChoice`]) and `f16` (default false).
/// Here "auto" is what cubecl sees, and through wgpu's WebGPU backend it never sees subgroups:
/// the package resolves "auto" against the adapter's features before it calls in
/// (pkg/src/webgpu.js `resolveKernels`).
fn kernel_options(kernels: Option<String>, f16: Option<bool>) -> Result<KernelOptions> {
    Ok(KernelOptions {
        kernels: kernels.as_deref().unwrap_or("auto").parse()?,
        f16: f16.unwrap_or(false),
    })
}

#[wasm_bindgen]
pub struct Phi2Model {
    engine: Engine,
    backend: BackendKind,
    /// The adapter and the kernels the model got ([`describe_device`]).
    device: String,
}

#[wasm_bindgen]
impl Phi2Model {
    /// Loads a model directory — a bundle (`manifest.json`) or an HF checkpoint — from
    /// `base_url` with plain requests, on `backend` ("webgpu", the default, or "cpu"), with
    /// `f16` and `kernels` (see [`kernel_options`]); `subgroups`: whether the adapter has the
    /// feature (the package asks for it on the device wherever it is offered).
    pub async fn load(
        base_url: String,
        backend: Option<String>,
        f16: Option<bool>,
        kernels: Option<String>,
        subgroups: Option<bool>,
    ) -> std::result::Result<Phi2Model, JsValue> {
        console_error_panic_hook::set_once();
        let backend = parse_backend(backend).map_err(js_error)?;
        let options = kernel_options(kernels, f16).map_err(js_error)?;
        let device = backend
            .device(subgroups.unwrap_or(false))
            .await
            .map_err(js_error)?;
        let base = if base_url.ends_with('/') {
            base_url
        } else {
            format!("{base_url}/")
        };
        let (model, tokenizer) = load_model(&HttpSource { base }, &device, options)
            .await
            .map_err(js_error)?;
        Ok(Phi2Model::new(model, tokenizer, backend))
    }

    /// The adapter (what it offers) and the kernels this model runs, as `phi2 bench` reports
    /// them; "cpu (burn-flex)" on the CPU backend.
    #[wasm_bindgen(getter)]
    pub fn device(&self) -> String {
        self.device.clone()
    }

    #[wasm_bindgen(getter, js_name = backendName)]
    pub fn backend_name(&self) -> String {
        match self.backend {
            BackendKind::Wgpu => "webgpu".into(),
            BackendKind::Cpu => "cpu".into(),
        }
    }

    /// Tokens the model can attend to: prompt and generated text together.
    #[wasm_bindgen(getter, js_name = contextLength)]
    pub fn context_length(&self) -> std::result::Result<usize, JsValue> {
        Ok(borrow_loaded(&self.engine)?.model.context_length())
    }

    pub fn tokenize(&self, text: &str) -> std::result::Result<Vec<u32>, JsValue> {
        borrow_loaded(&self.engine)?
            .tokenizer
            .encode(text)
            .map_err(js_error)
    }

    /// Starts a generation and returns it as an async iterator of `{tokenId, text}`; its final
    /// result (and `stats` afterwards) holds the figures. `options` is `{maxTokens,
    /// temperature, topK, topP, repetitionPenalty, frequencyPenalty, presencePenalty, seed,
    /// stop, responseFormat}`, every key optional (greedy by default). The previous generation
    /// ends; its cache serves the prompt's shared start.
    pub fn generate(
        &self,
        prompt: &str,
        options: JsValue,
    ) -> std::result::Result<JsValue, JsValue> {
        let params = sampling_params(&options).map_err(js_error)?;
        self.start(prompt, params, None, js_option_names)
    }

    /// Answers an OpenAI chat completion `request` (`{messages, max_tokens, temperature,
    /// top_p, seed, stop, frequency_penalty, presence_penalty, response_format, stream,
    /// stream_options}`; see [`crate::chat`]) as an async iterator of `chat.completion.chunk`
    /// objects whose final result is the `chat.completion`; `stats` afterwards as for
    /// `generate`. The previous generation ends; its cache serves the conversation's start.
    pub fn chat(&self, request: JsValue) -> std::result::Result<JsValue, JsValue> {
        let request: serde_json::Value = js_json(&request, "request").map_err(js_error)?;
        let id = format!("chatcmpl-{:016x}", random_seed());
        let created = (js_sys::Date::now() / 1000.0) as u64;
        let start = ChatRun::start(&request, id, created, random_seed()).map_err(js_error)?;
        // OpenAI's names, as the request gives them.
        self.start(&start.prompt, start.params, Some(start.run), |e| e)
    }

    /// Compiles the model's GPU pipelines before the first real prompt (compiling costs
    /// seconds on first use): see [`crate::Phi::warm_up`], then a greedy pick from its logits
    /// (the default sampling's kernels).
    #[wasm_bindgen(js_name = warmUp)]
    #[allow(clippy::await_holding_refcell_ref)] // the borrow is the lock: see `borrow_loaded`
    pub fn warm_up(&self) -> Promise {
        let engine = self.engine.clone();
        future_to_promise(async move {
            let loaded = borrow_loaded(&engine)?;
            let logits = loaded.model.warm_up();
            crate::generation::read_floats(crate::generation::device_candidates(logits, None))
                .await
                .map_err(js_error)?;
            Ok(JsValue::UNDEFINED)
        })
    }

    /// The benchmark `phi2 bench` runs ([`crate::bench::run`]): resolves to its report
    /// (camelCase keys). `response_format` (optional) decodes under that constraint. Ends any
    /// running generation.
    #[allow(clippy::await_holding_refcell_ref)] // the borrow is the lock: see `borrow_loaded`
    pub fn bench(
        &self,
        prompt_tokens: usize,
        gen_tokens: usize,
        copy_mb: u32,
        response_format: JsValue,
    ) -> Promise {
        let engine = self.engine.clone();
        future_to_promise(async move {
            let response_format: Option<ResponseFormat> =
                match response_format.is_undefined() || response_format.is_null() {
                    true => None,
                    false => serde_json::from_value(
                        js_json(&response_format, "responseFormat").map_err(js_error)?,
                    )
                    .map_err(|e| js_error(Error::option("responseFormat", e.to_string())))?,
                };
            let mut loaded = borrow_loaded(&engine)?;
            let Loaded {
                model,
                tokenizer,
                session,
                generation,
                ..
            } = &mut *loaded;
            *session = None; // its KV cache would count in the memory figures
            *generation += 1; // which ends the generation that had it
            let report = crate::bench::run(
                model,
                tokenizer,
                prompt_tokens,
                gen_tokens,
                u64::from(copy_mb) << 20,
                response_format,
                &now_ms,
            )
            .await
            .map_err(js_error)?;
            Ok(to_js(&report))
        })
    }

    /// Frees the model's GPU and wasm memory; later calls fail with a `StateError`.
    pub fn unload(&self) -> std::result::Result<(), JsValue> {
        let mut engine = self.engine.try_borrow_mut().map_err(|_| {
            state_error("the model is busy with a running step; stop the generation first")
        })?;
        *engine = None;
        Ok(())
    }
}

impl Phi2Model {
    /// The generation iterator of `prompt` (a chat's when `chat` is given); `name_options`
    /// names an option in an error as its caller's API does.
    fn start(
        &self,
        prompt: &str,
        params: SamplingParams,
        chat: Option<ChatRun>,
        name_options: fn(Error) -> Error,
    ) -> std::result::Result<JsValue, JsValue> {
        let mut loaded = borrow_loaded(&self.engine)?;
        let ids = loaded.tokenizer.encode(prompt).map_err(js_error)?;
        let Loaded {
            model,
            tokenizer,
            grammars,
            session,
            generation,
        } = &mut *loaded;
        // A refused start leaves the previous session (and its cache) as it was.
        let started = Session::start(model, tokenizer, grammars, session, ids, params)
            .map_err(|e| js_error(name_options(e)))?;
        *session = Some(started);
        *generation += 1;
        let generation = Generation {
            engine: self.engine.clone(),
            id: loaded.generation,
            state: Rc::new(RefCell::new(GenerationState {
                timings: Timings::start(now_ms()),
                stopped: false,
                stats: None,
                chat,
                pending: VecDeque::new(),
            })),
        };
        Ok(async_iterable(generation.into()))
    }

    fn new(model: Phi, tokenizer: PhiTokenizer, backend: BackendKind) -> Self {
        Phi2Model {
            device: describe_device(model.device(), model.kernel_plan()),
            engine: Rc::new(RefCell::new(Some(Loaded {
                model,
                tokenizer,
                grammars: LazyGrammars::default(),
                session: None,
                generation: 0,
            }))),
            backend,
        }
    }
}

struct GenerationState {
    timings: Timings,
    stopped: bool,
    stats: Option<GenerationStats>,
    /// A chat completion's run: its items are chunks, its result the completion.
    chat: Option<ChatRun>,
    /// A chat's final chunks, yielded after the last token.
    pending: VecDeque<serde_json::Value>,
}

/// One running generation (an async iterator; `generate` makes it iterable).
#[wasm_bindgen]
pub struct Generation {
    engine: Engine,
    id: u64,
    state: Rc<RefCell<GenerationState>>,
}

/// A generation's result: the stats, or a chat's `chat.completion`.
fn final_result(state: &GenerationState, stats: &GenerationStats) -> JsValue {
    match &state.chat {
        Some(run) => to_js(&run.completion(stats)),
        None => to_js(stats),
    }
}

fn iterator_result(done: bool, value: &JsValue) -> JsValue {
    let result = Object::new();
    let _ = Reflect::set(&result, &"done".into(), &done.into());
    let _ = Reflect::set(&result, &"value".into(), value);
    result.into()
}

#[wasm_bindgen]
impl Generation {
    /// Resolves to `{done: false, value: {tokenId, text}}` for each token, then to
    /// `{done: true, value: stats}`.
    #[allow(clippy::await_holding_refcell_ref)] // the borrow is the lock: see `borrow_loaded`
    pub fn next(&self) -> Promise {
        let engine = self.engine.clone();
        let state = self.state.clone();
        let id = self.id;
        future_to_promise(async move {
            let mut loaded = borrow_loaded(&engine)?;
            if let Some(chunk) = state.borrow_mut().pending.pop_front() {
                return Ok(iterator_result(false, &to_js(&chunk)));
            }
            if let Some(stats) = &state.borrow().stats {
                return Ok(iterator_result(true, &final_result(&state.borrow(), stats)));
            }
            let Loaded {
                model,
                tokenizer,
                session,
                generation,
                ..
            } = &mut *loaded;
            if *generation != id {
                return Err(state_error(
                    "this generation was ended by a newer generate() call",
                ));
            }
            let session = session
                .as_mut()
                .ok_or_else(|| state_error("this generation has ended"))?;
            // A chat yields only tokens that add to its answer: steps go on until one does.
            loop {
                if state.borrow().stopped {
                    session.cancel();
                }
                let token = session.next(model, tokenizer).await.map_err(js_error)?;
                let mut state = state.borrow_mut();
                let Some(token) = token else {
                    let stats = state.timings.stats(session);
                    let state = &mut *state;
                    if let Some(run) = state.chat.as_mut() {
                        state.pending.extend(run.finish_chunks(&stats));
                    }
                    let result = match state.pending.pop_front() {
                        Some(chunk) => iterator_result(false, &to_js(&chunk)),
                        None => iterator_result(true, &final_result(state, &stats)),
                    };
                    state.stats = Some(stats);
                    return Ok(result);
                };
                state.timings.token(now_ms());
                match state.chat.as_mut() {
                    Some(run) => {
                        if let Some(chunk) = run.delta(&token.text) {
                            return Ok(iterator_result(false, &to_js(&chunk)));
                        }
                    }
                    None => {
                        let item = Object::new();
                        Reflect::set(&item, &"tokenId".into(), &token.id.into())?;
                        Reflect::set(&item, &"text".into(), &token.text.into())?;
                        return Ok(iterator_result(false, &item.into()));
                    }
                }
            }
        })
    }

    /// Ends the generation before its next token (a Stop button); it reports stop reason
    /// "cancelled" (a chat: finish reason "stop"). Safe to call at any time, also while a step
    /// is running.
    pub fn stop(&self) {
        self.state.borrow_mut().stopped = true;
    }

    /// Called by `for await` when the loop exits early: stops and finishes.
    #[wasm_bindgen(js_name = "return")]
    pub fn finish(&self) -> Promise {
        self.stop();
        self.next()
    }

    /// The figures, once the generation has finished: prompt, reused and generated tokens,
    /// time to first token, prefill and decode tokens/s, stop reason.
    #[wasm_bindgen(getter)]
    pub fn stats(&self) -> JsValue {
        self.state
            .borrow()
            .stats
            .as_ref()
            .map_or(JsValue::UNDEFINED, to_js)
    }
}

/// A bundle being loaded: created from its manifest, given its tokenizer, then fed its chunks
/// in order by the package's fetcher. Each chunk is verified (size, sha256) before use, so a
/// rejected one may be fetched again and pushed again.
#[wasm_bindgen]
pub struct BundleLoading {
    loader: BundleLoader,
    tokenizer: Option<PhiTokenizer>,
    backend: BackendKind,
    context_length: Option<usize>,
}

#[wasm_bindgen]
impl BundleLoading {
    /// Checks the manifest (`manifest_url` names it in errors) and `context_length` (tokens,
    /// default the model's) against it, and acquires the device. `f16`, `kernels` and
    /// `subgroups`: as [`Phi2Model::load`] takes them.
    pub async fn start(
        manifest: Vec<u8>,
        manifest_url: String,
        backend: Option<String>,
        f16: Option<bool>,
        kernels: Option<String>,
        subgroups: Option<bool>,
        context_length: Option<usize>,
    ) -> std::result::Result<BundleLoading, JsValue> {
        console_error_panic_hook::set_once();
        let options = kernel_options(kernels, f16).map_err(js_error)?;
        let manifest = parse_manifest(&manifest, &manifest_url).map_err(js_error)?;
        if let Some(tokens) = context_length {
            checked_context(&manifest.config, tokens).map_err(|e| js_error(js_option_names(e)))?;
        }
        let backend = parse_backend(backend).map_err(js_error)?;
        let device = backend
            .device(subgroups.unwrap_or(false))
            .await
            .map_err(js_error)?;
        Ok(BundleLoading {
            loader: BundleLoader::new(manifest, &device, options).map_err(js_error)?,
            tokenizer: None,
            backend,
            context_length,
        })
    }

    /// The tokenizer file the manifest names.
    #[wasm_bindgen(getter, js_name = tokenizerFile)]
    pub fn tokenizer_file(&self) -> String {
        self.loader.manifest().tokenizer.clone()
    }

    /// Chunk file names, in the order `push` takes them.
    #[wasm_bindgen(getter, js_name = chunkFiles)]
    pub fn chunk_files(&self) -> Vec<String> {
        self.loader
            .manifest()
            .chunks
            .iter()
            .map(|c| c.file.clone())
            .collect()
    }

    /// Chunk sizes in bytes, in the same order.
    #[wasm_bindgen(getter, js_name = chunkSizes)]
    pub fn chunk_sizes(&self) -> Vec<f64> {
        self.loader
            .manifest()
            .chunks
            .iter()
            .map(|c| c.size as f64)
            .collect()
    }

    #[wasm_bindgen(js_name = setTokenizer)]
    pub fn set_tokenizer(&mut self, bytes: &[u8]) -> std::result::Result<(), JsValue> {
        let file = self.loader.manifest().tokenizer.clone();
        self.tokenizer = Some(PhiTokenizer::from_bytes(bytes, &file).map_err(js_error)?);
        Ok(())
    }

    /// Verifies chunk `index` (fetched from `url`) and uploads the tensors it completes.
    /// `sha256`: the chunk's digest (hex) computed by WebCrypto over exactly these bytes;
    /// without it (WebCrypto exists only in secure contexts) the digest is computed here.
    pub fn push(
        &mut self,
        index: usize,
        bytes: &[u8],
        url: &str,
        sha256: Option<String>,
    ) -> std::result::Result<(), JsValue> {
        self.loader
            .push(index, bytes, sha256.as_deref(), url)
            .map_err(js_error)
    }

    /// The model, once the tokenizer is set and every chunk has been pushed.
    pub fn finish(self) -> std::result::Result<Phi2Model, JsValue> {
        let tokenizer = self
            .tokenizer
            .ok_or_else(|| state_error("the tokenizer was not given (setTokenizer)"))?;
        let mut model = self.loader.finish().map_err(js_error)?;
        if let Some(tokens) = self.context_length {
            model.limit_context(tokens).map_err(js_error)?;
        }
        Ok(Phi2Model::new(model, tokenizer, self.backend))
    }
}

/// What the bundle described by `manifest` (`manifest_url` names it in errors) needs of the
/// device's memory with a context of `context_length` tokens (default: the model's), its KV
/// cache in f16 or f32 ([`memory_needs`]), before anything else is fetched.
#[wasm_bindgen(js_name = memoryNeeds)]
pub fn bundle_memory_needs(
    manifest: &[u8],
    manifest_url: &str,
    context_length: Option<usize>,
    kv_cache_f16: bool,
) -> std::result::Result<JsValue, JsValue> {
    let manifest = parse_manifest(manifest, manifest_url).map_err(js_error)?;
    let context = match context_length {
        Some(tokens) => {
            checked_context(&manifest.config, tokens).map_err(|e| js_error(js_option_names(e)))?
        }
        None => manifest.config.max_position_embeddings,
    };
    Ok(to_js(&memory_needs(&manifest, context, kv_cache_f16)))
}

/// A plain JS value (`what` names it in errors) as JSON.
fn js_json(value: &JsValue, what: &str) -> Result<serde_json::Value> {
    let json = js_sys::JSON::stringify(value)
        .ok()
        .and_then(|s| s.as_string())
        .ok_or_else(|| Error::option(what, "must be a plain object"))?;
    serde_json::from_str(&json).map_err(|e| Error::option(what, e.to_string()))
}

/// Reads the JS options object; a missing seed is drawn at random.
fn sampling_params(options: &JsValue) -> Result<SamplingParams> {
    if options.is_undefined() || options.is_null() {
        return Ok(SamplingParams {
            seed: random_seed(),
            ..SamplingParams::default()
        });
    }
    let mut value = js_json(options, "options")?;
    let Some(map) = value.as_object_mut() else {
        return Err(Error::option("options", "must be a plain object"));
    };
    // One key at a time first, so that a wrong value is reported under its own name.
    for (key, field) in map.iter() {
        let alone = serde_json::json!({ key.clone(): field.clone() });
        serde_json::from_value::<SamplingParams>(alone)
            .map_err(|e| Error::option(key, e.to_string()))?;
    }
    map.entry("seed").or_insert_with(|| random_seed().into());
    let params: SamplingParams =
        serde_json::from_value(value).map_err(|e| Error::option("options", e.to_string()))?;
    params.validate().map_err(js_option_names)?;
    Ok(params)
}

/// The error with an option named as JS names it (`response_format` → `responseFormat`).
fn js_option_names(e: Error) -> Error {
    match e {
        Error::InvalidOption { option, message } => Error::InvalidOption {
            option: camel_case(&option),
            message,
        },
        other => other,
    }
}

/// An option's JS name from its Rust name (`top_p` → `topP`).
fn camel_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        match c {
            '_' => upper = true,
            c if upper => {
                out.extend(c.to_uppercase());
                upper = false;
            }
            c => out.push(c),
        }
    }
    out
}

fn random_seed() -> u64 {
    (js_sys::Math::random() * 2f64.powi(53)) as u64
}
