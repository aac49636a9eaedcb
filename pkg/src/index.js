// phi2-web: Microsoft's Phi-2 in the browser. The public API.
//
//   const model = await Phi2.load(url, { onProgress, signal, cache: true, worker: true });
//   for await (const { text } of model.generate(prompt, { maxTokens, temperature, signal })) …
//   await model.unload();
//
// The engine (engine.js: fetching, caching, the wasm model) runs in a module Web Worker by
// default; `worker: false` runs the same engine on the calling thread.

import { Engine } from './engine.js';
import { deleteCache, isCached, manifestUrl } from './cache.js';
import { abortError, ERROR_NAMES, Phi2Error } from './errors.js';
import { gpuAdapter } from './webgpu.js';

export { ERROR_NAMES, Phi2Error };

/** What relative URLs mean: the page's base (also for the worker, which has its own). */
const pageBase = () => globalThis.document?.baseURI ?? globalThis.location?.href;

/** The engine inside a Web Worker, behind the same interface as Engine. */
class WorkerEngine {
  #worker;
  #nextId = 1;
  /** Request id → handlers for its messages. */
  #requests = new Map();
  #broken = null;
  /** Stops the running generation, if any. */
  #stopGeneration = null;

  constructor(worker) {
    this.#worker = worker;
    worker.onmessage = ({ data }) => this.#requests.get(data.id)?.(data);
    worker.onerror = (event) => {
      event.preventDefault?.();
      this.#fail(new Phi2Error('InternalError', `the engine's worker failed: ${event.message ?? 'script error'}`));
    };
  }

  #fail(error) {
    this.#broken = error;
    for (const handler of this.#requests.values()) handler({ type: 'error', error: error.toJSON() });
    this.#requests.clear();
  }

  /** Sends a request; `onMessage` sees every message for it until it returns true (the end). */
  #request(message, signal, onMessage) {
    if (this.#broken) throw this.#broken;
    const id = this.#nextId++;
    const abort = () => this.#worker.postMessage({ type: 'abort', id });
    signal?.addEventListener('abort', abort, { once: true });
    this.#requests.set(id, (data) => {
      if (onMessage(data)) {
        this.#requests.delete(id);
        signal?.removeEventListener('abort', abort);
      }
    });
    this.#worker.postMessage({ ...message, id });
    if (signal?.aborted) abort();
    return id;
  }

  static async load(url, { onProgress = () => {}, signal, workerUrl, ...options }) {
    let worker;
    try {
      worker = workerUrl
        ? new Worker(workerUrl, { type: 'module' })
        : new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
    } catch (error) {
      throw new Phi2Error('UnsupportedError', `cannot start the engine's module worker (${error.message}); pass worker: false`);
    }
    const engine = new WorkerEngine(worker);
    try {
      engine.info = await new Promise((resolve, reject) => {
        engine.#request({ type: 'load', url, options }, signal, (data) => {
          if (data.type === 'progress') {
            onProgress(data.event);
            return false;
          }
          if (data.type === 'result') resolve(data.value);
          else reject(Phi2Error.fromJSON(data.error));
          return true;
        });
      });
    } catch (error) {
      worker.terminate();
      throw error;
    }
    return engine;
  }

  /**
   * Tokens arrive as the worker makes them, a few ahead of the consumer (worker.js
   * TOKENS_AHEAD); the consumer takes them at its own pace. Once stopped (signal, stop() or an
   * early exit) it yields nothing more: tokens already here are dropped, and the stats count
   * only the tokens the consumer received.
   */
  async *generate(prompt, options = {}) {
    const { signal, ...params } = options ?? {};
    if (signal !== undefined && !(signal instanceof AbortSignal)) {
      throw new Phi2Error('OptionError', 'signal must be an AbortSignal', { option: 'signal' });
    }
    const arrived = [];
    let wake = null;
    let end = null;
    const id = this.#request({ type: 'generate', prompt, options: params }, undefined, (data) => {
      if (data.type === 'token') arrived.push(data.value);
      else end = data;
      wake?.();
      return data.type !== 'token';
    });
    let delivered = 0;
    let stopped = false;
    const stop = () => {
      if (stopped) return;
      stopped = true;
      if (!end) this.#worker.postMessage({ type: 'abort', id });
      wake?.();
    };
    const untilWoken = async () => {
      await new Promise((resolve) => (wake = resolve));
      wake = null;
    };
    const finish = () => {
      if (end.type === 'error') throw Phi2Error.fromJSON(end.error);
      const stats = stopped && delivered < end.value.generatedTokens
        ? { ...end.value, generatedTokens: delivered, stopReason: 'cancelled' }
        : end.value;
      this.lastStats = stats;
      return stats;
    };
    this.#stopGeneration = stop;
    signal?.addEventListener('abort', stop, { once: true });
    if (signal?.aborted) stop();
    let returned = false;
    try {
      while (!end || (!stopped && arrived.length > 0)) {
        if (stopped || arrived.length === 0) {
          await untilWoken();
          continue;
        }
        delivered += 1;
        this.#worker.postMessage({ type: 'pull', id, delivered });
        yield arrived.shift();
      }
      returned = true;
      return finish();
    } finally {
      signal?.removeEventListener('abort', stop);
      if (this.#stopGeneration === stop) this.#stopGeneration = null;
      if (!returned) {
        // The consumer left early (break, or an error): the worker stops within a few tokens,
        // and the stats are still this generation's.
        stop();
        while (!end) await untilWoken();
        try {
          finish();
        } catch {
          // the consumer's own exit or error is what the caller sees
        }
      }
    }
  }

  stop() {
    this.#stopGeneration?.();
  }

  bench(options) {
    return new Promise((resolve, reject) => {
      this.#request({ type: 'bench', options }, undefined, (data) => {
        if (data.type === 'result') resolve(data.value);
        else reject(Phi2Error.fromJSON(data.error));
        return true;
      });
    });
  }

  async unload() {
    if (this.#broken) return;
    this.stop();
    await new Promise((resolve) => this.#request({ type: 'unload' }, undefined, () => (resolve(), true)));
    this.#worker.terminate();
    this.#broken = new Phi2Error('StateError', 'the model has been unloaded; load it again');
  }
}

export class Phi2 {
  #engine;
  #unloaded = false;

  /** Use `Phi2.load()`; a Phi2 made any other way has no model. */
  constructor(engine = null) {
    this.#engine = engine;
  }

  /**
   * Loads the phi2-web bundle at `url` (its folder or its manifest.json, relative to the page).
   * Options: `onProgress(event)`, `signal`, `cache` (default true), `worker` (default true),
   * `backend` ('auto' (default: WebGPU, else the CPU), 'webgpu', 'cpu'), `concurrency`
   * (parallel chunk downloads, default 3), `stallTimeoutMs` (default 30000), `f16`
   * (default false), `kernels` (default 'auto'), `workerUrl` and `wasmUrl` (where the package's worker.js and wasm file are
   * served, when a bundler moved them).
   */
  static async load(url, options = {}) {
    const { worker = true, onProgress, signal, ...rest } = options ?? {};
    if (typeof url !== 'string' && !(url instanceof URL)) {
      throw new Phi2Error('OptionError', 'url must be a string or URL', { option: 'url' });
    }
    if (onProgress !== undefined && typeof onProgress !== 'function') {
      throw new Phi2Error('OptionError', 'onProgress must be a function', { option: 'onProgress' });
    }
    if (signal?.aborted) throw abortError(signal);
    const href = manifestUrl(url, pageBase());
    for (const key of ['workerUrl', 'wasmUrl']) {
      if (rest[key] !== undefined) rest[key] = new URL(rest[key], pageBase()).href;
    }
    if (rest.cache !== false) {
      // Ask that the cached model survive storage pressure (granted silently or not at all;
      // only a window can ask).
      globalThis.navigator?.storage?.persist?.().catch(() => {});
    }
    const useWorker = worker && typeof Worker !== 'undefined';
    if (worker && !useWorker) {
      // Asked for a worker where there is none (e.g. inside a worker already): say so.
      throw new Phi2Error('UnsupportedError', 'Web Workers are not available here; pass worker: false');
    }
    try {
      const engine = useWorker
        ? await WorkerEngine.load(href, { onProgress, signal, ...rest })
        : await Engine.load(href, { onProgress, signal, ...rest });
      return new Phi2(engine);
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
   * `maxTokens` (256), `temperature` (0 = greedy), `topK`, `topP`, `repetitionPenalty`, `seed`,
   * `stop` (strings), `signal`. A new generate ends the previous one; the start both prompts
   * share is not run again (multi-turn chat). `model.stats` afterwards holds the figures.
   */
  generate(prompt, options = {}) {
    const iterator = (async function* (model) {
      const engine = model.#ready();
      const stats = yield* engine.generate(prompt, options);
      return stats;
    })(this);
    return iterator;
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

  /** Removes the bundle at `url` from the cache; resolves to whether anything was removed. */
  static deleteCache(url) {
    return deleteCache(manifestUrl(url, pageBase()));
  }

  /** Whether this browser can run the model on the GPU (otherwise it runs on the CPU). */
  static async hasWebGPU() {
    return (await gpuAdapter()) !== null;
  }
}

export default Phi2;
