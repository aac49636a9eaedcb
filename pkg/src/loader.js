// The bundle's files from the network or the cache: the manifest, the tokenizer, then the chunks
// in parallel (at most `concurrency` and MAX_IN_FLIGHT_BYTES at once), each retried on transient
// failures, hashed by WebCrypto and handed in order to the engine's loader, which verifies it
// before use. A chunk is cached only once verified.

import { abortError, Phi2Error } from './errors.js';

/** Chunks downloaded in parallel (default of the `concurrency` option). */
export const DEFAULT_CONCURRENCY = 3;
/**
 * Chunk bytes downloading or waiting for the engine at once: with 32 MiB chunks, two. This is
 * the JS side of the loader's memory (the wasm side holds one chunk and the largest tensor).
 */
const MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024;
const ATTEMPTS = 4;
const RETRY_DELAY_MS = 500;
/** A download attempt that receives nothing for this long is abandoned and retried (default). */
export const STALL_MS = 30_000;

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
 * engine's own (sha2 in wasm) was a large share of a cached load (BENCHMARKS.md). Undefined
 * where there is no WebCrypto (it needs a secure context): the engine then hashes the chunk
 * itself.
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
export async function fetchManifest(cache, href, signal, stallMs) {
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

/**
 * Fetches everything the manifest lists into `loading` (the wasm BundleLoading made from
 * `manifestFile`): the tokenizer, then the chunks. `warnings` collects what the caller should
 * know, e.g. that storage was full.
 * @param {import('./wasm/phi2_web.js').BundleLoading} loading
 * @param {string} href the manifest's URL
 * @param {{ bytes: Uint8Array, fromCache: boolean }} manifestFile
 * @param {{ cache: Cache | null, signal: AbortSignal, stallMs?: number, concurrency?: number,
 *   onProgress?: (event: import('./index.js').LoadProgress) => void, warnings: Set<string> }} options
 * @returns {Promise<{ totalBytes: number, peakBufferedBytes: number }>}
 */
export async function fetchBundle(loading, href, manifestFile, {
  cache, signal, stallMs = STALL_MS, concurrency = DEFAULT_CONCURRENCY, onProgress = () => {}, warnings,
}) {
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
  return { totalBytes, peakBufferedBytes };
}

/**
 * Runs `download` holding the origin-wide Web Lock on the bundle at `href`: of two tabs (or
 * workers) loading one bundle, the second waits for the first's download, then finds the
 * chunks in the cache, and no chunk is downloaded twice at once. `onWait` is called when it
 * has to wait. Without Web Locks, or without a cache to share, it runs at once.
 * @template T
 * @param {string} href
 * @param {Cache | null} cache
 * @param {AbortSignal} signal
 * @param {() => void} onWait
 * @param {() => Promise<T>} download
 * @returns {Promise<T>}
 */
export async function withBundleLock(href, cache, signal, onWait, download) {
  const locks = globalThis.navigator?.locks;
  if (!locks || !cache) return download();
  const name = `phi2-web download ${href}`;
  const free = await locks.request(name, { ifAvailable: true }, async (lock) => (lock ? { result: await download() } : null));
  if (free) return free.result;
  onWait();
  try {
    return await locks.request(name, { signal }, download);
  } catch (error) {
    if (signal.aborted) throw abortError(signal);
    throw error;
  }
}
