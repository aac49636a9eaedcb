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

/** @typedef {typeof mainBuild} WasmBindings The exports both builds share. */

/** @type {Promise<WasmBindings> | null} */
let mainReady = null;
/** @type {{ threads: number, ready: Promise<WasmBindings> } | null} */
let threadsStarted = null;
/** @type {WebAssembly.Memory | null} The memory of the module the last load started. */
let wasmMemory = null;

/**
 * Starts the main build (from `wasmUrl`, or next to this file) unless it has started.
 * @param {string | URL | undefined} wasmUrl
 * @returns {Promise<WasmBindings>}
 */
export function startWasm(wasmUrl) {
  watchDevices();
  mainReady ??= initWasm({ module_or_path: wasmUrl ?? new URL('./wasm/phi2_web_bg.wasm', import.meta.url) })
    .then((exports) => {
      wasmMemory = exports.memory;
      return mainBuild;
    })
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
 * @returns {Promise<WasmBindings>}
 */
function startThreadedWasm(threads) {
  if (threadsStarted) return threadsStarted.ready;
  const ready = import('./wasm-threads/phi2_web.js')
    .then(async (threadsBuild) => {
      const exports = await threadsBuild.default({ module_or_path: new URL('./wasm-threads/phi2_web_bg.wasm', import.meta.url) });
      await threadsBuild.initThreadPool(threads);
      wasmMemory = exports.memory;
      return /** @type {WasmBindings} */ (/** @type {unknown} */ (threadsBuild));
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
 * The wasm module for a model on `backend`, and the threads its CPU backend computes on:
 * `threads` (default: the cores the browser reports) where the page allows more than one,
 * otherwise one with the reason in `note`.
 * @param {{ backend: 'webgpu' | 'cpu', wasmUrl: string | URL | undefined, threads: number | undefined }} options
 * @returns {Promise<{ wasm: WasmBindings, threads: number | null, note: string | null }>}
 */
export async function startEngineWasm({ backend, wasmUrl, threads }) {
  if (backend !== 'cpu') return { wasm: await startWasm(wasmUrl), threads: null, note: null };
  const wanted = threads ?? globalThis.navigator?.hardwareConcurrency ?? 1;
  const reason = wanted > 1 ? whyOneThread() : null;
  if (wanted > 1 && !reason) {
    try {
      const wasm = await startThreadedWasm(wanted);
      return { wasm, threads: /** @type {NonNullable<typeof threadsStarted>} */ (threadsStarted).threads, note: null };
    } catch (error) {
      const why = `the threads build could not start (${error instanceof Error ? error.message : error})`;
      return { wasm: await startWasm(wasmUrl), threads: 1, note: `the CPU backend runs on one thread: ${why}` };
    }
  }
  const note = reason ? `the CPU backend runs on one thread: ${reason}` : null;
  return { wasm: await startWasm(wasmUrl), threads: 1, note };
}

/** The linear memory of the module the last load started (it never shrinks: also its peak). */
export function wasmMemoryBytes() {
  return wasmMemory?.buffer.byteLength ?? 0;
}
