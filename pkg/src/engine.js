// @ts-check
// The engine: loads a bundle into the wasm model (the files come through loader.js) and runs
// generations. The same code runs inside the package's Web Worker (worker.js) and, with
// `worker: false`, on the calling thread.

import { manifestUrl, openCache } from './cache.js';
import { abortError, Phi2Error } from './errors.js';
import {
  DEFAULT_CONCURRENCY, fetchBundle, fetchManifest, STALL_MS, withBundleLock,
} from './loader.js';
import { requirements, shortfall } from './requirements.js';
import { MAX_THREADS, startEngineWasm, startWasm } from './wasm-module.js';
import {
  chooseBackend, deviceLost, nameDevice, resolveKernels,
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
 * @typedef {import('./index.js').Requirements} Requirements
 * @typedef {Omit<LoadOptions, 'worker' | 'workerUrl' | 'shared' | 'whenBusy' | 'persist'>} EngineLoadOptions
 */

/** The `kernels` option's values (see the package README). */
const KERNELS = ['auto', 'portable', 'subgroups'];

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
 * Load options with their defaults, checked.
 * @param {EngineLoadOptions} options
 */
function loadSettings(options) {
  const {
    onProgress = () => {}, signal, cache = true, backend = 'auto', concurrency = DEFAULT_CONCURRENCY,
    wasmUrl, stallTimeoutMs: stallMs = STALL_MS, f16 = false, kernels = 'auto', contextLength, threads,
  } = options ?? {};
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
  if (contextLength !== undefined && !(Number.isInteger(contextLength) && contextLength >= 1)) {
    throw new Phi2Error('OptionError', `contextLength ${contextLength} is not a positive integer`, { option: 'contextLength' });
  }
  if (threads !== undefined && !(Number.isInteger(threads) && threads >= 1 && threads <= MAX_THREADS)) {
    throw new Phi2Error('OptionError', `threads ${threads} is not an integer in 1..${MAX_THREADS}`, { option: 'threads' });
  }
  signal?.throwIfAborted();
  return { onProgress, signal, cache, backend, concurrency, wasmUrl, stallMs, f16: Boolean(f16), kernels, contextLength, threads };
}

/**
 * What a load and `requirements` both need first (besides the wasm module): the backend and
 * its adapter, the kernels, the cache and the manifest's URL.
 * @param {string} url
 * @param {ReturnType<typeof loadSettings>} settings
 */
async function prepare(url, settings) {
  const chosen = await chooseBackend(settings.backend);
  if (chosen.backend === 'webgpu' && deviceLost()) throw modelError();
  const kernels = resolveKernels(settings.kernels, chosen.adapter);
  const cache = settings.cache ? await openCache() : null;
  return { chosen, kernels, cache, href: manifestUrl(url) };
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
   * (see index.d.ts; `worker`, `shared`, `whenBusy`, `persist` and `workerUrl` are the
   * caller's business). Checks the bundle's requirements before any chunk is fetched; a
   * shortfall is the first reason's error (QuotaError, DeviceError, OutOfMemoryError).
   * @param {string} url
   * @param {EngineLoadOptions} options
   */
  static async load(url, options = {}) {
    const settings = loadSettings(options);
    const { onProgress, signal: callerSignal, concurrency, stallMs } = settings;
    // Ends the downloads still running when the load fails (or the caller aborts it).
    const stopDownloads = new AbortController();
    const signal = callerSignal ? AbortSignal.any([callerSignal, stopDownloads.signal]) : stopDownloads.signal;
    const started = performance.now();
    const { chosen, kernels, cache, href } = await prepare(url, settings);
    const { wasm, memory, threads, note } = await startEngineWasm({ backend: chosen.backend, wasmUrl: settings.wasmUrl, threads: settings.threads });
    const warnings = new Set(note ? [note] : []);
    /** @type {import('./wasm/phi2_web.js').BundleLoading | undefined} Freed if the load fails. */
    let loading;
    try {
      // One tab downloads at a time; a second one finds the chunks in the cache.
      const wait = () => onProgress({ phase: 'wait', loadedBytes: 0, totalBytes: 0, chunk: 0, chunks: 0 });
      const fetched = await withBundleLock(href, cache, signal, wait, async () => {
        const manifestFile = await fetchManifest(cache, href, signal, stallMs);
        const needs = await requirements(href, manifestFile, { wasm, cache, ...chosen, f16: settings.f16, contextLength: settings.contextLength });
        const missing = shortfall(needs);
        if (missing) throw missing;
        for (const warning of needs.warnings) warnings.add(warning);
        // The device has subgroups wherever the adapter offers them (watchDevices asks).
        loading = await wasm.BundleLoading.start(
          manifestFile.bytes, href, chosen.backend, settings.f16, kernels,
          Boolean(chosen.adapter?.features.has('subgroups')), settings.contextLength,
        );
        const got = await fetchBundle(loading, href, manifestFile, { cache, signal, stallMs, concurrency, onProgress, warnings });
        return { ...got, needs };
      });
      const { totalBytes, peakBufferedBytes, needs } = fetched;
      const ready = /** @type {import('./wasm/phi2_web.js').BundleLoading} */ (loading);
      loading = undefined;
      const chunks = ready.chunkFiles.length;
      const model = ready.finish(); // consumes it
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
        wasmMemoryBytes: memory.buffer.byteLength,
        threads,
        requirements: needs,
        persisted: needs.storage?.persisted ?? false,
        shared: false,
        warnings: [...warnings],
      });
    } catch (error) {
      loading?.free();
      if (callerSignal?.aborted) throw abortError(callerSignal);
      throw modelError(error);
    } finally {
      stopDownloads.abort(new Phi2Error('AbortError', 'the load ended'));
    }
  }

  /**
   * What loading the bundle at `url` (its manifest URL, absolute) with `options` needs, and
   * whether it fits here (index.d.ts `Requirements`); fetches only the manifest.
   * @param {string} url
   * @param {EngineLoadOptions} options
   * @returns {Promise<Requirements>}
   */
  static async requirements(url, options = {}) {
    const settings = loadSettings(options);
    const { chosen, cache, href } = await prepare(url, settings);
    const wasm = await startWasm(settings.wasmUrl);
    const manifestFile = await fetchManifest(cache, href, settings.signal, settings.stallMs);
    return requirements(href, manifestFile, { wasm, cache, ...chosen, f16: settings.f16, contextLength: settings.contextLength });
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
