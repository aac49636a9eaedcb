// @ts-check
// The engine's wasm module: started once per realm (the page, or the engine's worker), by the
// engine and by `requirements`, which reads the manifest with it.

import initWasm from './wasm/phi2_web.js';
import { Phi2Error } from './errors.js';
import { watchDevices } from './webgpu.js';

/** @type {Promise<void> | null} */
let wasmReady = null;
/** @type {WebAssembly.Memory | null} */
let wasmMemory = null;

/**
 * Starts the wasm module (from `wasmUrl`, or next to this file) unless it has started.
 * @param {string | URL | undefined} wasmUrl
 */
export function startWasm(wasmUrl) {
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

/** The wasm module's linear memory (it never shrinks, so this is also its peak). */
export function wasmMemoryBytes() {
  return wasmMemory?.buffer.byteLength ?? 0;
}
