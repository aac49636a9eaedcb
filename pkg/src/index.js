// phi2-web: Microsoft's Phi-2 in the browser. The public API.
//
//   const needs = await Phi2.requirements(url);          // before any download: fits, reasons
//   const model = await Phi2.load(url, { onProgress, signal, cache: true, worker: true });
//   for await (const { text } of model.generate(prompt, { maxTokens, temperature, signal })) …
//   await model.unload();
//
// The engine (engine.js: fetching, caching, the wasm model) runs in a module Web Worker by
// default; `shared: true` shares one such worker between the origin's tabs (SharedWorker);
// `worker: false` runs the same engine on the calling thread.

import { Engine } from './engine.js';
import { WorkerEngine } from './worker-engine.js';
import { cachedBundles, deleteCache, isCached, manifestUrl } from './cache.js';
import { abortError, ERROR_NAMES, Phi2Error } from './errors.js';
import { gpuAdapter } from './webgpu.js';

export { ERROR_NAMES, Phi2Error };

/** What relative URLs mean: the page's base (also for the worker, which has its own). */
const pageBase = () => globalThis.document?.baseURI ?? globalThis.location?.href;

export class Phi2 {
  #engine;
  #unloaded = false;

  /** Use `Phi2.load()`; a Phi2 made any other way has no model. */
  constructor(engine = null) {
    this.#engine = engine;
  }

  /**
   * Loads the phi2-web bundle at `url` (its folder or its manifest.json, relative to the page).
   * Options (index.d.ts `LoadOptions`): `onProgress(event)`, `signal`, `cache` (default true),
   * `worker` (default true), `shared` (default false: one engine for the origin's tabs, in a
   * SharedWorker), `whenBusy` ('queue' (default) or 'cancel': a generation while another tab's
   * runs), `persist` (default false: ask that the cache survive storage pressure), `backend`
   * ('auto' (default: WebGPU, else the CPU), 'webgpu', 'cpu'), `contextLength` (default the
   * model's), `threads` (the CPU backend's, default the cores; more than one needs a cross-origin
   * isolated page), `concurrency` (parallel chunk downloads, default 3), `stallTimeoutMs` (default
   * 30000), `f16` (default false), `kernels` (default 'auto'), `workerUrl` and `wasmUrl` (where
   * the package's worker.js and wasm file are served, when a bundler moved them). The bundle's
   * requirements are checked before any chunk is fetched.
   */
  static async load(url, options = {}) {
    const {
      worker = true, shared = false, whenBusy = 'queue', persist = false, onProgress, signal, ...rest
    } = options ?? {};
    const href = checkedHref(url);
    if (onProgress !== undefined && typeof onProgress !== 'function') {
      throw new Phi2Error('OptionError', 'onProgress must be a function', { option: 'onProgress' });
    }
    if (!['queue', 'cancel'].includes(whenBusy)) {
      throw new Phi2Error('OptionError', `whenBusy "${whenBusy}" is not one of queue, cancel`, { option: 'whenBusy' });
    }
    if (signal?.aborted) throw abortError(signal);
    resolveUrls(rest);
    // Only a window can ask. The load does not wait for the answer: Firefox asks the user,
    // who may never reply. model.info.persisted is the answer if it came during the load.
    const persisting = persist && rest.cache !== false
      ? globalThis.navigator?.storage?.persist?.().catch(() => false)
      : undefined;
    const useWorker = worker && typeof Worker !== 'undefined';
    if (worker && !useWorker) {
      // Asked for a worker where there is none (e.g. inside a worker already): say so.
      throw new Phi2Error('UnsupportedError', 'Web Workers are not available here; pass worker: false');
    }
    try {
      const engine = useWorker && shared
        ? await loadShared(href, { onProgress, signal, whenBusy, ...rest })
        : useWorker
          ? await WorkerEngine.load(href, { onProgress, signal, ...rest })
          : await Engine.load(href, { onProgress, signal, ...rest });
      if (persisting) engine.info = { ...engine.info, persisted: await answerSoFar(persisting, engine.info.persisted) };
      return new Phi2(engine);
    } catch (error) {
      throw Phi2Error.from(error);
    }
  }

  /**
   * What loading the bundle at `url` with these load options needs, and whether it fits here
   * (index.d.ts `Requirements`): bytes to download and already cached, the storage quota,
   * the device memory for the context length, the adapter's limits, `fits` and the reasons.
   * Fetches only the manifest. Runs on the calling thread (it starts the engine's wasm
   * module there to read the manifest).
   */
  static async requirements(url, options = {}) {
    const { worker, shared, whenBusy, persist, onProgress, workerUrl, ...rest } = options ?? {};
    const href = checkedHref(url);
    resolveUrls(rest);
    try {
      return await Engine.requirements(href, rest);
    } catch (error) {
      throw Phi2Error.from(error);
    }
  }

  #ready() {
    if (this.#unloaded) throw new Phi2Error('StateError', 'the model has been unloaded; load it again');
    if (!this.#engine) throw new Phi2Error('StateError', 'no model is loaded; create one with Phi2.load()');
    return this.#engine;
  }

  /**
   * Streams the continuation of `prompt`: an async iterator of `{ text, tokenId }`. Options:
   * `maxTokens` (256), `temperature` (0 = greedy), `topK`, `topP`, `repetitionPenalty`,
   * `frequencyPenalty`, `presencePenalty`, `seed`, `stop` (strings), `responseFormat` (JSON, a
   * JSON Schema or a grammar, as OpenAI's `response_format`), `signal`. A new generate ends the
   * previous one; the start both prompts share is not run again (multi-turn chat).
   * `model.stats` afterwards holds the figures.
   */
  generate(prompt, options = {}) {
    return this.#ready().generate(prompt, options);
  }

  /**
   * OpenAI's chat completions: `await model.chat.completions.create({ messages, stream, … })`
   * resolves to a `chat.completion`, or with `stream: true` to an async iterable of
   * `chat.completion.chunk`s. The messages become a prompt in Phi-2's formats (see the README).
   * `signal` may be given in the options (as OpenAI's client takes it) or in the request; once
   * it aborts, no chunk follows and the call (or the stream) throws an AbortError. A bad request
   * rejects `create` itself, streamed or not.
   */
  chat = Object.freeze({
    completions: Object.freeze({
      create: (request, options) => this.#createChatCompletion(request, options),
    }),
  });

  async #createChatCompletion(request, options = {}) {
    if (request === null || typeof request !== 'object' || Array.isArray(request)) {
      throw new Phi2Error('OptionError', 'the request must be an object ({ messages, … })', { option: 'request' });
    }
    const { signal: requestSignal, ...body } = request;
    // JSON (the request's way into the engine) would turn these into null, which means "default".
    for (const [field, value] of Object.entries(body)) {
      if (typeof value === 'number' && !Number.isFinite(value)) {
        throw new Phi2Error('OptionError', `option \`${field}\`: ${value} is not a finite number`, { option: field });
      }
    }
    const signal = options?.signal ?? requestSignal;
    if (signal?.aborted) throw abortError(signal);
    const chunks = this.#ready().chat(body, { signal });
    let next = await chunks.next(); // a bad request fails here, before anything streams
    if (!body.stream) {
      while (!next.done) next = await chunks.next();
      if (signal?.aborted) throw abortError(signal);
      return next.value;
    }
    return (async function* () {
      try {
        while (!next.done && !signal?.aborted) {
          yield next.value;
          next = await chunks.next();
        }
      } finally {
        if (!next.done) await chunks.return(undefined);
      }
      if (signal?.aborted) throw abortError(signal);
      return next.value;
    })();
  }

  /** Ends the running generation before its next token. */
  stop() {
    this.#engine?.stop();
  }

  /**
   * Measures this model on this device, like `phi2 bench`: `{promptTokens = 128, genTokens =
   * 32, copyMb = 64}` in; time to first token, prefill and decode tokens/s, kernel launches per
   * token, effective decode bandwidth and a device copy's bandwidth, the prefill's and the
   * device's multiply-add rates and the prefill / decode ratio with its ceiling out.
   */
  async bench(options = {}) {
    try {
      return await this.#ready().bench(options);
    } catch (error) {
      throw Phi2Error.from(error);
    }
  }

  /** Figures of the last finished generation (tokens, time to first token, tokens/s, stop reason). */
  get stats() {
    return this.#engine?.lastStats;
  }

  /** Where it runs ('webgpu' or 'cpu'), size, load time, and cache warnings. */
  get info() {
    return this.#engine?.info;
  }

  get backend() {
    return this.#engine?.info.backend;
  }

  async unload() {
    if (this.#unloaded || !this.#engine) return;
    this.#unloaded = true;
    await this.#engine.unload();
    this.#engine = null;
  }

  /** Whether the bundle at `url` is fully in the cache (loading it needs no network). */
  static isCached(url) {
    return isCached(manifestUrl(url, pageBase()));
  }

  /**
   * The bundles in the cache, each `{ url, bytes, complete }` (its manifest's URL, the bytes of
   * its files there, whether a load would fetch nothing): what deleting one would free.
   */
  static cachedBundles() {
    return cachedBundles();
  }

  /** Removes the bundle at `url` from the cache; resolves to whether anything was removed. */
  static deleteCache(url) {
    return deleteCache(manifestUrl(url, pageBase()));
  }

  /** Whether this browser can run the model on the GPU (otherwise it runs on the CPU). */
  static async hasWebGPU() {
    return (await gpuAdapter()) !== null;
  }
}

/** What `promise` resolved to if it has settled, else `otherwise` (without waiting). */
function answerSoFar(promise, otherwise) {
  return Promise.race([promise, Promise.resolve(otherwise)]);
}

/** `url` as the manifest's absolute URL (relative to the page), or an OptionError. */
function checkedHref(url) {
  if (typeof url !== 'string' && !(url instanceof URL)) {
    throw new Phi2Error('OptionError', 'url must be a string or URL', { option: 'url' });
  }
  return manifestUrl(url, pageBase());
}

/** Makes `workerUrl` and `wasmUrl` absolute (relative to the page), in place. */
function resolveUrls(options) {
  for (const key of ['workerUrl', 'wasmUrl']) {
    if (options[key] !== undefined) options[key] = new URL(options[key], pageBase()).href;
  }
}

/**
 * The engine in the origin's SharedWorker for this bundle and options, or, where there is no
 * SharedWorker (or it has no WebGPU where the page has), the page's own worker, with a warning.
 */
async function loadShared(href, options) {
  const fallback = async (why) => {
    const { whenBusy, ...dedicated } = options;
    const engine = await WorkerEngine.load(href, dedicated);
    engine.info = { ...engine.info, warnings: [...engine.info.warnings, `not shared between tabs: ${why}; this tab runs its own engine`] };
    return engine;
  };
  if (typeof SharedWorker === 'undefined') return fallback('this browser has no SharedWorker');
  // 'auto' is decided here: a shared worker without WebGPU must not fall back to the CPU
  // where the page has a GPU.
  const backend = options.backend ?? 'auto';
  const resolved = backend === 'auto' && (await gpuAdapter()) ? 'webgpu' : backend;
  try {
    return await WorkerEngine.load(href, { ...options, backend: resolved, shared: true });
  } catch (error) {
    // No module SharedWorker here, or one without WebGPU.
    if (error?.name !== 'UnsupportedError') throw error;
    return fallback(error.message);
  }
}

export default Phi2;
