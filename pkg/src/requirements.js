// @ts-check
// What loading a bundle needs — bytes to download and to store, device memory, buffer sizes —
// and whether this browser has it, known from the manifest alone, before any chunk is fetched.
// `Phi2.requirements()` reports it; every load checks it first, so that a shortfall is a typed
// error at once rather than a failure at 90 %.

import { bundleFiles } from './cache.js';
import { Phi2Error } from './errors.js';
import { maxBufferBytes } from './webgpu.js';

/**
 * @typedef {import('./index.js').Requirements} Requirements
 * @typedef {import('./index.js').Backend} Backend
 * @typedef {any} GPUAdapter WebGPU's adapter (TypeScript's DOM library has no WebGPU types)
 */

/** wasm32's largest memory: on the CPU backend the model and its KV cache live there. */
const WASM_MEMORY_LIMIT = 4 * 1024 ** 3;

/**
 * What Chromium reports as the quota, whatever the real one (its StaticStorageQuota privacy
 * measure, on since Dec 2024): usage + 10 GiB. The real limit then shows only when a write fails.
 */
const FIXED_REPORTED_HEADROOM = 10 * 1024 ** 3;

/**
 * Storage figures for `cache` (null without one: nothing will be stored).
 * @param {Cache | null} cache
 */
async function storageFigures(cache) {
  const storage = globalThis.navigator?.storage;
  if (!cache || !storage?.estimate) return null;
  const { quota = 0, usage = 0 } = await storage.estimate();
  const persisted = (await storage.persisted?.().catch(() => false)) ?? false;
  const availableBytes = Math.max(0, quota - usage);
  return { quotaBytes: quota, usageBytes: usage, availableBytes, quotaIsFixed: availableBytes === FIXED_REPORTED_HEADROOM, persisted };
}

/**
 * The adapter's limits and features that decide whether the model runs on it.
 * @param {GPUAdapter | null} adapter
 */
function adapterFigures(adapter) {
  if (!adapter) return null;
  const { description, vendor, architecture, isFallbackAdapter } = adapter.info ?? {};
  return {
    name: description || [vendor, architecture].filter(Boolean).join(' ') || 'WebGPU adapter',
    maxBufferSize: adapter.limits.maxBufferSize,
    maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
    shaderF16: adapter.features.has('shader-f16'),
    subgroups: adapter.features.has('subgroups'),
    isFallbackAdapter: Boolean(isFallbackAdapter),
  };
}

/** @param {number} bytes */
const MB = (bytes) => `${(bytes / 1e6).toFixed(1)} MB`;

/**
 * What loading the bundle whose manifest (`manifestFile`, from `href`) describes needs, and
 * whether it fits here. Reads only the manifest and the cache's index.
 * @param {string} href the manifest's URL
 * @param {{ bytes: Uint8Array }} manifestFile
 * @param {{ wasm: import('./wasm-module.js').WasmBindings, cache: Cache | null, backend: Backend,
 *   adapter: GPUAdapter | null, f16?: boolean, contextLength?: number }} options
 * @returns {Promise<Requirements>}
 */
export async function requirements(href, manifestFile, { wasm, cache, backend, adapter, f16 = false, contextLength }) {
  // The engine parses and checks the manifest (a FormatError names what is wrong).
  const kvCacheF16 = Boolean(f16 && adapter?.features.has('shader-f16'));
  const memory = wasm.memoryNeeds(manifestFile.bytes, href, contextLength, kvCacheF16);
  const manifest = JSON.parse(new TextDecoder().decode(manifestFile.bytes));
  const cachedUrls = new Set(cache ? (await cache.keys()).map((request) => request.url) : []);
  const [, , ...chunkUrls] = bundleFiles(href, manifest);
  let totalBytes = manifestFile.bytes.length;
  let cachedBytes = cachedUrls.has(href) ? manifestFile.bytes.length : 0;
  manifest.chunks.forEach((/** @type {{ size: number }} */ chunk, /** @type {number} */ index) => {
    totalBytes += chunk.size;
    if (cachedUrls.has(chunkUrls[index])) cachedBytes += chunk.size;
  });
  const download = { totalBytes, cachedBytes, bytesToDownload: totalBytes - cachedBytes };
  const storage = await storageFigures(cache);
  const gpu = backend === 'webgpu' ? adapterFigures(adapter) : null;

  /** @type {Requirements['reasons']} */
  const reasons = [];
  if (gpu) {
    const limit = maxBufferBytes(adapter);
    const { name, bytes } = memory.largestBuffer;
    if (bytes > limit) {
      reasons.push({
        name: 'DeviceError',
        message: `${name} needs a ${bytes}-byte buffer; this adapter (${gpu.name}) allows at most ${limit} bytes (maxBufferSize ${gpu.maxBufferSize}, maxStorageBufferBindingSize ${gpu.maxStorageBufferBindingSize})`,
        details: { tensor: name, bytes, limit },
      });
    }
  } else if (memory.totalBytes > WASM_MEMORY_LIMIT) {
    reasons.push({
      name: 'OutOfMemoryError',
      message: `on the CPU the model needs ${MB(memory.totalBytes)} of wasm memory at a context of ${memory.contextLength} tokens; wasm allows at most ${MB(WASM_MEMORY_LIMIT)} (pass a smaller contextLength)`,
      details: { option: 'contextLength', bytes: memory.totalBytes, limit: WASM_MEMORY_LIMIT },
    });
  }
  if (storage && download.bytesToDownload > storage.availableBytes) {
    reasons.push({
      name: 'QuotaError',
      message: `storing the model needs ${MB(download.bytesToDownload)} more (${MB(download.cachedBytes)} of ${MB(download.totalBytes)} already cached), but only ${MB(storage.availableBytes)} of this site's storage quota is free: free space (Phi2.cachedBundles(), Phi2.deleteCache()) or load with cache: false`,
      details: { file: href, bytes: download.bytesToDownload, available: storage.availableBytes, quota: storage.quotaBytes },
    });
  }
  /** @type {string[]} */
  const warnings = [];
  if (f16 && backend === 'webgpu' && !kvCacheF16) {
    warnings.push('f16 was asked for, but the adapter has no shader-f16: the model runs in f32');
  }
  const systemMemoryGb = /** @type {{ deviceMemory?: number }} */ (globalThis.navigator ?? {}).deviceMemory;
  if (systemMemoryGb && memory.totalBytes > systemMemoryGb * 1024 ** 3) {
    warnings.push(`the model needs ${MB(memory.totalBytes)}, more than this device's ~${systemMemoryGb} GB of memory; a smaller contextLength needs less`);
  }
  return { url: href, backend, download, storage, memory, adapter: gpu, fits: reasons.length === 0, reasons, warnings };
}

/**
 * The error a load fails with when the bundle does not fit (the first reason), or null.
 * @param {Requirements} needs
 */
export function shortfall(needs) {
  const [reason] = needs.reasons;
  return reason ? new Phi2Error(reason.name, reason.message, reason.details) : null;
}
