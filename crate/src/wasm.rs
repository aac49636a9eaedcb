//! The browser API (wasm-bindgen). The model lives in an `Rc<RefCell<…>>` so each exported
//! async call owns what it needs; a second call while one is running gets a clear error.

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::{Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::{future_to_promise, JsFuture};

use crate::error::{Error, Result};
use crate::weights::{load_model, FileSource};
use crate::{BackendKind, Phi, PhiTokenizer, SamplingParams, Session};

#[wasm_bindgen]
extern "C" {
    /// The global `fetch`, present in windows and workers alike.
    #[wasm_bindgen(js_name = fetch)]
    fn global_fetch(url: &str) -> Promise;
}

fn js_error(e: Error) -> JsError {
    JsError::new(&e.to_string())
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

struct Engine {
    model: Phi,
    tokenizer: PhiTokenizer,
    session: Option<Session>,
}

#[wasm_bindgen]
pub struct Phi2Model {
    engine: Rc<RefCell<Engine>>,
    backend: BackendKind,
}

#[wasm_bindgen]
impl Phi2Model {
    /// Loads an HF-layout model directory (`config.json`, `tokenizer.json`, safetensors) from
    /// `base_url` on `backend` ("webgpu", the default, or "cpu").
    pub async fn load(
        base_url: String,
        backend: Option<String>,
    ) -> std::result::Result<Phi2Model, JsError> {
        console_error_panic_hook::set_once();
        let backend: BackendKind = backend
            .as_deref()
            .unwrap_or("webgpu")
            .parse()
            .map_err(js_error)?;
        let device = backend.device().await.map_err(js_error)?;
        let base = if base_url.ends_with('/') {
            base_url
        } else {
            format!("{base_url}/")
        };
        let (model, tokenizer) = load_model(&HttpSource { base }, &device)
            .await
            .map_err(js_error)?;
        Ok(Phi2Model {
            engine: Rc::new(RefCell::new(Engine {
                model,
                tokenizer,
                session: None,
            })),
            backend,
        })
    }

    #[wasm_bindgen(js_name = backendName)]
    pub fn backend_name(&self) -> String {
        match self.backend {
            BackendKind::Wgpu => "webgpu".into(),
            BackendKind::Cpu => "cpu".into(),
        }
    }

    pub fn tokenize(&self, text: &str) -> std::result::Result<Vec<u32>, JsError> {
        let engine = self.engine()?;
        engine.tokenizer.encode(text).map_err(js_error)
    }

    /// Starts a generation; `options` is `{maxTokens, temperature, topK, topP,
    /// repetitionPenalty, seed, stop}`, every key optional (greedy by default).
    pub fn start(&self, prompt: &str, options: JsValue) -> std::result::Result<(), JsError> {
        let params = sampling_params(&options).map_err(js_error)?;
        let mut engine = self.engine()?;
        let ids = engine.tokenizer.encode(prompt).map_err(js_error)?;
        let session = Session::new(&engine.model, ids, params).map_err(js_error)?;
        engine.session = Some(session);
        Ok(())
    }

    /// Resolves to `{tokenId, text}` for the next token, or `undefined` when finished.
    pub fn next(&self) -> Promise {
        let engine = self.engine.clone();
        future_to_promise(async move {
            let mut engine = engine
                .try_borrow_mut()
                .map_err(|_| JsError::new("generation: next() called while a step is running"))?;
            let Engine {
                model,
                tokenizer,
                session,
            } = &mut *engine;
            let session = session
                .as_mut()
                .ok_or_else(|| JsError::new("generation: call start() before next()"))?;
            match session.next(model, tokenizer).await.map_err(js_error)? {
                None => Ok(JsValue::UNDEFINED),
                Some(token) => {
                    let item = Object::new();
                    Reflect::set(&item, &"tokenId".into(), &token.id.into())?;
                    Reflect::set(&item, &"text".into(), &token.text.into())?;
                    Ok(item.into())
                }
            }
        })
    }

    #[wasm_bindgen(js_name = generatedIds)]
    pub fn generated_ids(&self) -> std::result::Result<Vec<u32>, JsError> {
        let engine = self.engine()?;
        Ok(engine
            .session
            .as_ref()
            .map(|s| s.generated_ids().to_vec())
            .unwrap_or_default())
    }

    #[wasm_bindgen(js_name = stopReason)]
    pub fn stop_reason(&self) -> std::result::Result<Option<String>, JsError> {
        let engine = self.engine()?;
        Ok(engine
            .session
            .as_ref()
            .and_then(Session::stop_reason)
            .map(|r| r.as_str().to_string()))
    }
}

impl Phi2Model {
    fn engine(&self) -> std::result::Result<std::cell::RefMut<'_, Engine>, JsError> {
        self.engine
            .try_borrow_mut()
            .map_err(|_| JsError::new("generation: the model is busy with a running step"))
    }
}

/// Reads the JS options object; a missing seed is drawn at random.
fn sampling_params(options: &JsValue) -> Result<SamplingParams> {
    if options.is_undefined() || options.is_null() {
        return Ok(SamplingParams {
            seed: random_seed(),
            ..SamplingParams::default()
        });
    }
    let json = js_sys::JSON::stringify(options)
        .ok()
        .and_then(|s| s.as_string())
        .ok_or_else(|| Error::option("options", "must be a plain object"))?;
    let mut value: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| Error::option("options", e.to_string()))?;
    if let Some(map) = value.as_object_mut() {
        map.entry("seed").or_insert_with(|| random_seed().into());
    }
    serde_json::from_value(value).map_err(|e| Error::option("options", e.to_string()))
}

fn random_seed() -> u64 {
    (js_sys::Math::random() * 2f64.powi(53)) as u64
}
