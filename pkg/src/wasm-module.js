// @ts-check
// The engine's wasm modules, each started once per realm (the page, or the engine's worker):
// - the main build (wasm/): WebGPU, and the CPU backend on one thread; `requirements` reads
//   the manifest with it;
// - the threads build (wasm-threads/): the CPU backend only, its 4-bit matmul on a pool of
//   Web Workers sharing the module's memory. Shared memory needs a cross-origin isolated page,
//   and the engine's thread waits for the pool, which only a worker may do.

import initWasm, * as mainBuild from './wasm/phi2_web.js';
import { Phi2Error } from './errors.js';
import { watchDevices } from './webgpu.js';

/**
 * @typedef {typeof mainBuild} WasmBindings The exports both builds share.
 * @typedef {{ bindings: WasmBindings, memory: WebAssembly.Memory }} StartedWasm
 */

/** @type {Promise<StartedWasm> | null} */
let mainReady = null;
/** @type {{ threads: number, ready: Promise<StartedWasm> } | null} */
let threadsStarted = null;

/**
 * Starts the main build (from `wasmUrl`, or next to this file) unless it has started.
 * @param {string | URL | undefined} wasmUrl
 * @returns {Promise<WasmBindings>}
 */
export async function startWasm(wasmUrl) {
  return (await startMainWasm(wasmUrl)).bindings;
}

/**
 * @param {string | URL | undefined} wasmUrl
 * @returns {Promise<StartedWasm>}
 */
function startMainWasm(wasmUrl) {
  watchDevices();
  mainReady ??= initWasm({ module_or_path: wasmUrl ?? new URL('./wasm/phi2_web_bg.wasm', import.meta.url) })
    .then((exports) => ({ bindings: mainBuild, memory: exports.memory }))
    .catch((error) => {
      mainReady = null;
      throw new Phi2Error('LoadError', `the engine's wasm module could not be loaded: ${error?.message ?? error}`);
    });
  return mainReady;
}

/**
 * Starts the threads build with a pool of `threads` workers unless it has started (a realm
 * keeps its first pool: rayon's pool is global).
 * @param {number} threads
 * @returns {Promise<StartedWasm>}
 */
function startThreadedWasm(threads) {
  if (threadsStarted) return threadsStarted.ready;
  const ready = import('./wasm-threads/phi2_web.js')
    .then(async (threadsBuild) => {
      const exports = await threadsBuild.default({ module_or_path: new URL('./wasm-threads/phi2_web_bg.wasm', import.meta.url) });
      await threadsBuild.initThreadPool(threads);
      return { bindings: /** @type {WasmBindings} */ (/** @type {unknown} */ (threadsBuild)), memory: exports.memory };
    })
    .catch((error) => {
      threadsStarted = null;
      throw error;
    });
  threadsStarted = { threads, ready };
  return ready;
}

/**
 * Why the CPU backend cannot use several threads here, or null when it can.
 * @returns {string | null}
 */
function whyOneThread() {
  if (!globalThis.crossOriginIsolated) {
    return 'the page is not cross-origin isolated (serve it with Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp; see the package README)';
  }
  if (!(/** @type {any} */ (globalThis).WorkerGlobalScope)) {
    return "the engine runs on the page's thread (worker: false), which may not wait for other threads";
  }
  if (typeof Worker !== 'function') return 'this worker cannot start workers of its own';
  return null;
}

/**
 * The wasm module for a model on `backend` (its bindings, and its memory: it never shrinks, so
 * its size is also its peak), and the threads its CPU backend computes on: `threads` (default:
 * the cores the browser reports) where the page allows more than one, otherwise one with the
 * reason in `note`. A realm keeps its first pool: a later load gets its size.
 * @param {{ backend: 'webgpu' | 'cpu', wasmUrl: string | URL | undefined, threads: number | undefined }} options
 * @returns {Promise<{ wasm: WasmBindings, memory: WebAssembly.Memory, threads: number | null, note: string | null }>}
 */
export async function startEngineWasm({ backend, wasmUrl, threads }) {
  const main = async (/** @type {number | null} */ threads, /** @type {string | null} */ note) => {
    const { bindings, memory } = await startMainWasm(wasmUrl);
    return { wasm: bindings, memory, threads, note };
  };
  if (backend !== 'cpu') return main(null, null);
  const wanted = threads ?? Math.min(globalThis.navigator?.hardwareConcurrency ?? 1, MAX_THREADS);
  const reason = wanted > 1 ? whyOneThread() : null;
  if (wanted > 1 && !reason) {
    try {
      const { bindings, memory } = await startThreadedWasm(wanted);
      return { wasm: bindings, memory, threads: /** @type {NonNullable<typeof threadsStarted>} */ (threadsStarted).threads, note: null };
    } catch (error) {
      const why = `the threads build could not start (${error instanceof Error ? error.message : error})`;
      return main(1, `the CPU backend runs on one thread: ${why}`);
    }
  }
  return main(1, reason ? `the CPU backend runs on one thread: ${reason}` : null);
}

/** The most threads the `threads` option takes, and the default's cap. */
export const MAX_THREADS = 256;
