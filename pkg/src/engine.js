// @ts-check
// The engine: loads a bundle into the wasm model (the files come through loader.js) and runs
// generations. The same code runs inside the package's Web Worker (worker.js) and, with
// `worker: false`, on the calling thread.

import initWasm, { BundleLoading } from './wasm/phi2_web.js';
import { manifestUrl, openCache } from './cache.js';
import { abortError, Phi2Error } from './errors.js';
import { DEFAULT_CONCURRENCY, fetchBundle, fetchManifest, STALL_MS } from './loader.js';
import {
  deviceLost, gpuAdapter, maxBufferBytes, nameDevice, resolveKernels, watchDevices,
} from './webgpu.js';

/**
 * @typedef {import('./index.js').LoadOptions} LoadOptions
 * @typedef {import('./index.js').ModelInfo} ModelInfo
 * @typedef {import('./index.js').GenerationStats} GenerationStats
 * @typedef {import('./index.js').GeneratedToken} GeneratedToken
 * @typedef {import('./index.js').GenerateOptions} GenerateOptions
 * @typedef {import('./index.js').BenchOptions} BenchOptions
 * @typedef {import('./index.js').BenchReport} BenchReport
 * @typedef {import('./index.js').Backend} Backend
 * @typedef {import('./index.js').ChatCompletionRequest} ChatCompletionRequest
 * @typedef {import('./index.js').ChatCompletion} ChatCompletion
 * @typedef {import('./index.js').ChatCompletionChunk} ChatCompletionChunk
 * @typedef {import('./index.js').Engine} EngineInterface
 * @typedef {any} GPUAdapter WebGPU's adapter (TypeScript's DOM library has no WebGPU types)
 */

/** The `kernels` option's values (see the package README). */
const KERNELS = ['auto', 'portable', 'subgroups'];

/** @type {Promise<void> | null} */
let wasmReady = null;
/** @type {WebAssembly.Memory | null} */
let wasmMemory = null;

/** @param {string | URL | undefined} wasmUrl */
function startWasm(wasmUrl) {
  watchDevices();
  wasmReady ??= initWasm({ module_or_path: wasmUrl ?? new URL('./wasm/phi2_web_bg.wasm', import.meta.url) })
    .then((exports) => {
      wasmMemory = exports.memory;
    })
    .catch((error) => {
      wasmReady = null;
      throw new Phi2Error('LoadError', `the engine's wasm module could not be loaded: ${error?.message ?? error}`);
    });
  return wasmReady;
}

/**
 * The error to report for a failure of the model. Once the GPU device is lost, every later
 * failure is that loss. wgpu makes one device per realm, so only a new realm — a new worker,
 * which every worker-mode load starts, or a reloaded page — gets a working one.
 * @param {unknown} [error]
 */
function modelError(error) {
  const lost = deviceLost();
  if (!lost) return Phi2Error.from(error);
  return new Phi2Error(
    'DeviceError',
    `the GPU device was lost (${lost.reason || 'unknown reason'}${lost.message ? `: ${lost.message}` : ''}); load the model again (in worker mode, the default, a new load starts afresh; on the page's thread, reload the page)`,
    { reason: lost.reason || 'unknown' },
  );
}

/**
 * @param {'auto' | Backend} requested
 * @returns {Promise<{ backend: Backend, adapter: GPUAdapter | null }>}
 */
async function chooseBackend(requested) {
  if (requested === 'cpu') return { backend: 'cpu', adapter: null };
  const adapter = await gpuAdapter();
  if (adapter) return { backend: 'webgpu', adapter };
  if (requested === 'webgpu') {
    throw new Phi2Error('UnsupportedError', 'this browser offers no WebGPU adapter; use backend "auto" or "cpu"');
  }
  return { backend: 'cpu', adapter: null };
}

/** @implements {EngineInterface} */
export class Engine {
  /** @type {import('./wasm/phi2_web.js').Phi2Model | null} */
  #model;
  /** @type {import('./wasm/phi2_web.js').Generation | null} */
  #generation = null;
  /** @type {(() => void) | null} Stops the running generation, if any. */
  #stopGeneration = null;
  /** Settles when the model's last call has (see `#inTurn`). */
  #turns = Promise.resolve();
  /** @type {ModelInfo} */
  info;
  /** @type {GenerationStats | undefined} */
  lastStats;

  /**
   * @param {import('./wasm/phi2_web.js').Phi2Model} model
   * @param {ModelInfo} info
   */
  constructor(model, info) {
    this.#model = model;
    this.info = info;
  }

  /**
   * Loads the bundle at `url` (its manifest URL, absolute) with the package's load options
   * (see index.d.ts; `worker` and `workerUrl` are the caller's business).
   * @param {string} url
   * @param {Omit<LoadOptions, 'worker' | 'workerUrl'>} options
   */
  static async load(url, options = {}) {
    const {
      onProgress = () => {}, signal: callerSignal, cache: useCache = true, backend = 'auto',
      concurrency = DEFAULT_CONCURRENCY, wasmUrl, stallTimeoutMs: stallMs = STALL_MS, f16 = false,
      kernels = 'auto',
    } = options;
    // Ends the downloads still running when the load fails (or the caller aborts it).
    const stopDownloads = new AbortController();
    const signal = callerSignal ? AbortSignal.any([callerSignal, stopDownloads.signal]) : stopDownloads.signal;
    if (!['auto', 'webgpu', 'cpu'].includes(backend)) {
      throw new Phi2Error('OptionError', `backend "${backend}" is not one of auto, webgpu, cpu`, { option: 'backend' });
    }
    if (!(Number.isInteger(concurrency) && concurrency >= 1 && concurrency <= 16)) {
      throw new Phi2Error('OptionError', `concurrency ${concurrency} is not an integer in 1..16`, { option: 'concurrency' });
    }
    if (!(Number.isFinite(stallMs) && stallMs > 0)) {
      throw new Phi2Error('OptionError', `stallTimeoutMs ${stallMs} is not a positive number of milliseconds`, { option: 'stallTimeoutMs' });
    }
    if (!KERNELS.includes(kernels)) {
      throw new Phi2Error('OptionError', `kernels "${kernels}" is not one of ${KERNELS.join(', ')}`, { option: 'kernels' });
    }
    callerSignal?.throwIfAborted();
    const started = performance.now();
    await startWasm(wasmUrl);
    const chosen = await chooseBackend(backend);
    if (chosen.backend === 'webgpu' && deviceLost()) throw modelError();
    const resolvedKernels = resolveKernels(kernels, chosen.adapter);
    const cache = useCache ? await openCache() : null;
    const warnings = new Set();
    const href = manifestUrl(url);

    const manifestFile = await fetchManifest(cache, href, signal, stallMs);
    let loading;
    try {
      // The engine checks the manifest before anything else is fetched.
      // The device has subgroups wherever the adapter offers them (watchDevices asks).
      loading = await BundleLoading.start(
        manifestFile.bytes, href, chosen.backend, Boolean(f16), resolvedKernels,
        Boolean(chosen.adapter?.features.has('subgroups')),
      );
    } catch (error) {
      throw Phi2Error.from(error);
    }
    try {
      if (chosen.adapter) loading.checkBufferLimit(maxBufferBytes(chosen.adapter));
      const { totalBytes, peakBufferedBytes } = await fetchBundle(loading, href, manifestFile, {
        cache, signal, stallMs, concurrency, onProgress, warnings,
      });
      const chunks = loading.chunkFiles.length;
      const model = loading.finish(); // consumes `loading`
      const compiling = () => onProgress({ phase: 'compile', loadedBytes: totalBytes, totalBytes, chunk: chunks, chunks });
      compiling();
      await model.warmUp();
      compiling();
      return new Engine(model, {
        backend: chosen.backend,
        device: nameDevice(model.device, chosen.adapter),
        contextLength: model.contextLength,
        totalBytes,
        loadMs: performance.now() - started,
        peakBufferedBytes,
        wasmMemoryBytes: wasmMemoryBytes(),
        warnings: [...warnings],
      });
    } catch (error) {
      try {
        loading.free();
      } catch {
        // already consumed by finish()
      }
      if (callerSignal?.aborted) throw abortError(callerSignal);
      throw modelError(error);
    } finally {
      stopDownloads.abort(new Phi2Error('AbortError', 'the load ended'));
    }
  }

  /**
   * Yields `{ text, tokenId }` per token; returns the stats. `options.signal` (or `stop()`)
   * ends it before the next token, with stop reason "cancelled".
   * @param {string} prompt
   * @param {GenerateOptions} [options]
   * @returns {AsyncGenerator<GeneratedToken, GenerationStats, undefined>}
   */
  async *generate(prompt, options = {}) {
    if (typeof prompt !== 'string') {
      throw new Phi2Error('OptionError', `prompt must be a string, not ${typeof prompt}`, { option: 'prompt' });
    }
    const { signal, ...params } = options ?? {};
    return /** @type {GenerationStats} */ (yield* this.#stream((model) => model.generate(prompt, params), signal));
  }

  /**
   * Answers an OpenAI chat completion request (see index.d.ts): yields its
   * `chat.completion.chunk`s and returns the `chat.completion`; `signal` (or `stop()`) ends it
   * as for `generate` (the public API turns a caller's abort into an AbortError).
   * @param {ChatCompletionRequest} request without its `signal`
   * @param {{ signal?: AbortSignal }} [options]
   * @returns {AsyncGenerator<ChatCompletionChunk, ChatCompletion, undefined>}
   */
  async *chat(request, { signal } = {}) {
    return /** @type {ChatCompletion} */ (yield* this.#stream((model) => model.chat(request), signal));
  }

  /**
   * Runs one generation of the wasm model (`start` makes it): yields its items and returns its
   * result; `signal` (or `stop()`) ends it before the next step, and no item is yielded after
   * that (a chat's closing chunks included). One runs at a time: a new one ends the previous
   * (whose cache serves it).
   * @param {(model: import('./wasm/phi2_web.js').Phi2Model) => any} start
   * @param {AbortSignal} [signal]
   * @returns {AsyncGenerator<any, any, undefined>}
   */
  async *#stream(start, signal) {
    this.stop();
    const generation = await this.#inTurn((model) => start(model));
    this.#generation = generation;
    let stopped = false;
    const stop = () => {
      stopped = true;
      generation.stop();
    };
    this.#stopGeneration = stop;
    if (signal?.aborted) stop();
    signal?.addEventListener('abort', stop, { once: true });
    let finished = false;
    try {
      for (;;) {
        let result;
        try {
          result = await this.#inTurn(() => generation.next());
        } catch (error) {
          // A newer generation took the model over (stopping this one first): it just ends.
          if (stopped && error instanceof Phi2Error && error.name === 'StateError') return undefined;
          throw error;
        }
        if (result.done) {
          finished = true;
          this.lastStats = generation.stats;
          return result.value;
        }
        if (!stopped) yield result.value;
      }
    } finally {
      signal?.removeEventListener('abort', stop);
      if (!finished) {
        // The consumer left early (break, or an error): end the generation cleanly so the
        // model is ready for the next one.
        generation.stop();
        try {
          await this.#inTurn(() => generation.next());
          this.lastStats = generation.stats;
        } catch {
          // superseded or unloaded: nothing to finish
        }
      }
      if (this.#generation === generation) {
        this.#generation = null;
        this.#stopGeneration = null;
      }
      generation.free();
    }
  }


  /**
   * Runs the benchmark `phi2 bench` runs (a synthetic prompt, greedy decoding, a device copy and
   * a register-only multiply-add kernel for comparison) and resolves to its report; ends a
   * running generation first.
   * @param {BenchOptions} [options]
   * @returns {Promise<BenchReport>}
   */
  async bench({ promptTokens = 128, genTokens = 32, copyMb = 64, responseFormat } = {}) {
    if (!this.#model) throw new Phi2Error('StateError', 'the model has been unloaded; load it again');
    for (const [option, value] of Object.entries({ promptTokens, genTokens, copyMb })) {
      if (!Number.isInteger(value) || value < 1) {
        throw new Phi2Error('OptionError', `${option} must be a positive integer, not ${value}`, { option });
      }
    }
    this.stop();
    const report = await this.#inTurn((model) => model.bench(promptTokens, genTokens, copyMb, responseFormat));
    return { ...report, device: this.info.device }; // the same device, named (nameDevice)
  }

  /**
   * Runs `call` with the model once every earlier call has settled: the model's async calls
   * hold it across their awaits, so two at once would find it busy. A generation left
   * unfinished (its consumer stopped iterating) holds nothing between its steps, so it never
   * blocks a newer one.
   * @template T
   * @param {(model: import('./wasm/phi2_web.js').Phi2Model) => T | Promise<T>} call
   * @returns {Promise<T>}
   */
  #inTurn(call) {
    const run = this.#turns.then(async () => {
      if (!this.#model) throw new Phi2Error('StateError', 'the model has been unloaded; load it again');
      try {
        return await call(this.#model);
      } catch (error) {
        throw modelError(error);
      }
    });
    this.#turns = run.then(() => undefined, () => undefined);
    return run;
  }

  /** Ends the running generation, if any, before its next token. */
  stop() {
    this.#stopGeneration?.();
  }

  /** Frees the model (GPU and wasm memory), after ending a running generation. */
  async unload() {
    this.stop();
    await this.#turns;
    if (!this.#model) return;
    try {
      this.#model.unload();
    } catch (error) {
      throw Phi2Error.from(error);
    }
    this.#model.free();
    this.#model = null;
  }
}

/** The wasm module's linear memory (it never shrinks, so this is also its peak). */
function wasmMemoryBytes() {
  return wasmMemory?.buffer.byteLength ?? 0;
}
