// The engine: fetches a bundle (parallel, cached, verified), feeds it to the wasm model, and runs
// generations. The same code runs inside the package's Web Worker (worker.js) and, with
// `worker: false`, on the calling thread.

import initWasm, { BundleLoading } from './wasm/phi2_web.js';
import { manifestUrl, openCache } from './cache.js';
import { abortError, Phi2Error } from './errors.js';
import {
  deviceLost, gpuAdapter, maxBufferBytes, nameDevice, resolveKernels, watchDevices,
} from './webgpu.js';

const DEFAULT_CONCURRENCY = 3;
/**
 * Chunk bytes downloading or waiting for the engine at once: with 32 MiB chunks, two. This is
 * the JS side of the loader's memory (the wasm side holds one chunk and the largest tensor).
 */
const MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024;
const ATTEMPTS = 4;
const RETRY_DELAY_MS = 500;
/** A download attempt that receives nothing for this long is abandoned and retried (default). */
const STALL_MS = 30_000;
/** The `kernels` option's values (see the package README). */
const KERNELS = ['auto', 'portable', 'subgroups'];

let wasmReady = null;
let wasmMemory = null;

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

const sleep = (ms, signal) =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(timer);
      reject(abortError(signal));
    }, { once: true });
  });

/**
 * One HTTP GET of `url` into memory, with retries (network errors, 5xx, 408/429, stalls,
 * cut-off bodies). `expectedBytes` (known for chunks) sizes the buffer: the body is written
 * straight into it, and a longer body is an error. `onBytes(n)` reports the bytes this attempt
 * has received so far.
 */
async function download(url, { expectedBytes, signal, onBytes = () => {}, what, stallMs = STALL_MS }) {
  let lastError;
  for (let attempt = 1; attempt <= ATTEMPTS; attempt++) {
    if (attempt > 1) await sleep(RETRY_DELAY_MS * 2 ** (attempt - 2), signal);
    signal?.throwIfAborted();
    const controller = new AbortController();
    const onAbort = () => controller.abort(signal.reason);
    signal?.addEventListener('abort', onAbort, { once: true });
    let stallTimer;
    const armStall = () => {
      clearTimeout(stallTimer);
      stallTimer = setTimeout(() => controller.abort(new Error(`no data for ${stallMs / 1000} s`)), stallMs);
    };
    let received = 0;
    try {
      armStall();
      const response = await fetch(url, { signal: controller.signal, cache: 'no-store' });
      if (!response.ok) {
        const error = new Phi2Error('LoadError', `${what} ${url}: HTTP status ${response.status}`, { file: url, status: response.status });
        const transient = response.status >= 500 || response.status === 408 || response.status === 429;
        if (!transient) throw error;
        lastError = error;
        continue;
      }
      const buffer = new Uint8Array(expectedBytes ?? Number(response.headers.get('content-length') ?? 0));
      let bytes = buffer;
      let at = 0;
      const reader = response.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        armStall();
        if (at + value.length > bytes.length) {
          if (expectedBytes !== undefined) {
            await reader.cancel();
            throw new Phi2Error('IntegrityError', `${what} ${url} is larger than the manifest's ${expectedBytes} bytes`, { file: url });
          }
          const grown = new Uint8Array(Math.max(2 * bytes.length, at + value.length));
          grown.set(bytes.subarray(0, at));
          bytes = grown;
        }
        bytes.set(value, at);
        at += value.length;
        received += value.length;
        onBytes(received);
      }
      if (expectedBytes !== undefined && at < expectedBytes) {
        lastError = new Phi2Error('LoadError', `${what} ${url}: the connection ended after ${at} of ${expectedBytes} bytes`, { file: url });
        continue;
      }
      return bytes.subarray(0, at);
    } catch (error) {
      if (signal?.aborted) throw abortError(signal);
      if (error instanceof Phi2Error) throw error;
      lastError = new Phi2Error('LoadError', `${what} ${url}: ${error?.message ?? error}`, { file: url });
    } finally {
      clearTimeout(stallTimer);
      signal?.removeEventListener('abort', onAbort);
    }
  }
  lastError.message += ` (after ${ATTEMPTS} attempts)`;
  throw lastError;
}

/**
 * The sha256 (hex) of `bytes` by WebCrypto: native code, off the calling thread, where the
 * engine's own (sha2 in wasm) took about a quarter of a cached load. Undefined where there is
 * no WebCrypto (it needs a secure context): the engine then hashes the chunk itself.
 */
async function sha256Hex(bytes) {
  const subtle = globalThis.crypto?.subtle;
  if (!subtle) return undefined;
  try {
    const digest = new Uint8Array(await subtle.digest('SHA-256', bytes));
    return Array.from(digest, (byte) => byte.toString(16).padStart(2, '0')).join('');
  } catch {
    return undefined; // the engine hashes it instead
  }
}

async function cachePut(cache, url, bytes, warnings) {
  if (!cache) return;
  try {
    await cache.put(url, new Response(bytes));
  } catch (error) {
    // Full storage must not fail the load: the model still runs, it just is not kept.
    warnings.add(`not cached (${error?.name ?? 'error'}: ${error?.message ?? error}); the next load downloads again`);
  }
}

/** The file from the cache when it is there, otherwise from the network. */
async function cachedOrDownload(cache, url, options) {
  const hit = cache ? await cache.match(url) : undefined;
  if (hit) return { bytes: new Uint8Array(await hit.arrayBuffer()), fromCache: true };
  return { bytes: await download(url, options), fromCache: false };
}

/** The manifest: from the network when reachable (it may have changed), else the cached copy. */
async function fetchManifest(cache, href, signal, stallMs) {
  const cached = cache ? await cache.match(href) : undefined;
  if (cached && globalThis.navigator?.onLine === false) {
    return { bytes: new Uint8Array(await cached.arrayBuffer()), fromCache: true };
  }
  try {
    const bytes = await download(href, { signal, what: 'manifest', stallMs });
    return { bytes, fromCache: false };
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    if (cached) return { bytes: new Uint8Array(await cached.arrayBuffer()), fromCache: true };
    if (error.details?.status === 404) {
      throw new Phi2Error('LoadError', `no phi2-web bundle at ${href} (404); make one with \`phi2 convert\``, { file: href });
    }
    throw error;
  }
}

async function chooseBackend(requested) {
  if (requested === 'cpu') return { backend: 'cpu', adapter: null };
  const adapter = await gpuAdapter();
  if (adapter) return { backend: 'webgpu', adapter };
  if (requested === 'webgpu') {
    throw new Phi2Error('UnsupportedError', 'this browser offers no WebGPU adapter; use backend "auto" or "cpu"');
  }
  return { backend: 'cpu', adapter: null };
}

export class Engine {
  #model;
  #generation = null;
  /** Settles when no generation is running. */
  #idle = Promise.resolve();

  constructor(model, info) {
    this.#model = model;
    this.info = info;
  }

  /**
   * Loads the bundle at `url` (its folder or manifest URL, absolute). Options: `onProgress`,
   * `signal`, `cache` (default true), `backend` ('auto' | 'webgpu' | 'cpu'), `concurrency`,
   * `wasmUrl`, `stallTimeoutMs` (default 30 000: a download receiving nothing that long is retried),
   * `f16` (default false: see the package README), `kernels` ('auto' | 'portable' | 'subgroups').
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
      const tokenizerHref = new URL(loading.tokenizerFile, href).href;
      const chunkHrefs = loading.chunkFiles.map((file) => new URL(file, href).href);
      const chunkSizes = loading.chunkSizes;
      const tokenizer = await cachedOrDownload(cache, tokenizerHref, { signal, what: 'tokenizer', stallMs });
      loading.setTokenizer(tokenizer.bytes);
      // Both are valid: keep them for next time (the manifest also lets deleteCache find chunks).
      if (!manifestFile.fromCache) await cachePut(cache, href, manifestFile.bytes, warnings);
      if (!tokenizer.fromCache) await cachePut(cache, tokenizerHref, tokenizer.bytes, warnings);

      const chunks = chunkSizes.length;
      const totalBytes = chunkSizes.reduce((sum, size) => sum + size, 0);
      // Progress only grows: a chunk counts the most bytes any attempt at it received.
      let loadedBytes = 0;
      const counted = new Array(chunks).fill(0);
      const count = (index, bytes) => {
        if (bytes <= counted[index]) return false;
        loadedBytes += bytes - counted[index];
        counted[index] = bytes;
        return true;
      };
      let receivedChunks = 0;
      let uploaded = 0;
      let peakBufferedBytes = 0;
      let bufferedBytes = 0;
      const report = (phase, chunk) => onProgress({ phase, loadedBytes, totalBytes, chunk, chunks });
      const fetchChunk = (index, { bypassCache = false } = {}) => {
        const options = {
          signal,
          stallMs,
          expectedBytes: chunkSizes[index],
          what: `chunk ${index}`,
          onBytes: (bytes) => {
            if (count(index, bytes)) report('download', receivedChunks);
          },
        };
        const got = bypassCache ? download(chunkHrefs[index], options).then((bytes) => ({ bytes, fromCache: false })) : cachedOrDownload(cache, chunkHrefs[index], options);
        return got.then(async (file) => {
          count(index, file.bytes.length);
          if (!bypassCache) receivedChunks += 1;
          bufferedBytes += file.bytes.length;
          peakBufferedBytes = Math.max(peakBufferedBytes, bufferedBytes);
          report(file.fromCache ? 'cache' : 'download', receivedChunks);
          // Hashed while earlier chunks upload; the engine checks it against the manifest.
          return { ...file, sha256: await sha256Hex(file.bytes) };
        });
      };

      // Up to `concurrency` chunks and MAX_IN_FLIGHT_BYTES in flight (always at least one);
      // the engine takes them in order.
      const inFlight = new Map();
      let inFlightBytes = 0;
      let nextToFetch = 0;
      for (let index = 0; index < chunks; index++) {
        while (
          nextToFetch < chunks &&
          inFlight.size < concurrency &&
          (inFlight.size === 0 || inFlightBytes + chunkSizes[nextToFetch] <= MAX_IN_FLIGHT_BYTES)
        ) {
          const pending = fetchChunk(nextToFetch);
          pending.catch(() => {}); // awaited in turn below; no unhandled-rejection noise
          inFlightBytes += chunkSizes[nextToFetch];
          inFlight.set(nextToFetch++, pending);
        }
        let file = await inFlight.get(index);
        inFlight.delete(index);
        signal?.throwIfAborted();
        try {
          loading.push(index, file.bytes, chunkHrefs[index], file.sha256);
        } catch (error) {
          // A chunk that does not match its sha256 (the bundle changed since it was cached,
          // storage went bad, a proxy mangled it) is fetched again from the network, once.
          if (error?.name !== 'IntegrityError') throw error;
          bufferedBytes -= file.bytes.length;
          file = await fetchChunk(index, { bypassCache: true });
          loading.push(index, file.bytes, chunkHrefs[index], file.sha256);
        }
        if (!file.fromCache) await cachePut(cache, chunkHrefs[index], file.bytes, warnings);
        bufferedBytes -= file.bytes.length;
        inFlightBytes -= chunkSizes[index];
        uploaded += 1;
        report('upload', uploaded);
      }
      const model = loading.finish();
      report('compile', chunks);
      await model.warmUp();
      report('compile', chunks);
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
   */
  async *generate(prompt, options = {}) {
    if (!this.#model) throw new Phi2Error('StateError', 'the model has been unloaded; load it again');
    if (typeof prompt !== 'string') {
      throw new Phi2Error('OptionError', `prompt must be a string, not ${typeof prompt}`, { option: 'prompt' });
    }
    const { signal, ...params } = options ?? {};
    // One generation at a time: a new one ends the previous (its cache serves this prompt).
    this.stop();
    await this.#idle;
    if (!this.#model) throw new Phi2Error('StateError', 'the model has been unloaded; load it again');
    let markIdle;
    this.#idle = new Promise((resolve) => (markIdle = resolve));
    let generation;
    try {
      generation = this.#model.generate(prompt, params);
    } catch (error) {
      markIdle();
      throw modelError(error);
    }
    this.#generation = generation;
    const stop = () => generation.stop();
    if (signal?.aborted) stop();
    signal?.addEventListener('abort', stop, { once: true });
    let finished = false;
    try {
      for (;;) {
        let result;
        try {
          result = await generation.next();
        } catch (error) {
          throw modelError(error);
        }
        if (result.done) {
          finished = true;
          this.lastStats = result.value;
          return result.value;
        }
        yield result.value;
      }
    } finally {
      signal?.removeEventListener('abort', stop);
      if (!finished) {
        // The consumer left early (break, or an error): end the generation cleanly so the
        // model is ready for the next one.
        generation.stop();
        try {
          this.lastStats = (await generation.next()).value;
        } catch {
          // superseded or unloaded: nothing to finish
        }
      }
      if (this.#generation === generation) this.#generation = null;
      generation.free();
      markIdle();
    }
  }

  /**
   * Runs the benchmark `phi2 bench` runs (a synthetic prompt, greedy decoding, a device copy and
   * a register-only multiply-add kernel for comparison) and resolves to its report; ends a
   * running generation first.
   */
  async bench({ promptTokens = 128, genTokens = 32, copyMb = 64 } = {}) {
    if (!this.#model) throw new Phi2Error('StateError', 'the model has been unloaded; load it again');
    for (const [option, value] of Object.entries({ promptTokens, genTokens, copyMb })) {
      if (!Number.isInteger(value) || value < 1) {
        throw new Phi2Error('OptionError', `${option} must be a positive integer, not ${value}`, { option });
      }
    }
    this.stop();
    await this.#idle;
    let markIdle;
    this.#idle = new Promise((resolve) => (markIdle = resolve));
    try {
      const report = await this.#model.bench(promptTokens, genTokens, copyMb);
      return { ...report, device: this.info.device }; // the same device, named (nameDevice)
    } catch (error) {
      throw modelError(error);
    } finally {
      markIdle();
    }
  }

  /** Ends the running generation, if any, before its next token. */
  stop() {
    this.#generation?.stop();
  }

  /** Frees the model (GPU and wasm memory), after ending a running generation. */
  async unload() {
    this.stop();
    await this.#idle;
    if (!this.#model) return;
    try {
      this.#model.unload();
    } catch (error) {
      throw Phi2Error.from(error);
    }
    this.#model.free();
    this.#model = null;
  }

  get loaded() {
    return this.#model !== null;
  }
}

/** The wasm module's linear memory (it never shrinks, so this is also its peak). */
export function wasmMemoryBytes() {
  return wasmMemory?.buffer.byteLength ?? 0;
}
