// WebGPU facts the engine needs before burn creates its device.

import { Phi2Error } from './errors.js';

let lostInfo = null;

/**
 * Wraps every requestDevice in this realm (window or worker), before wgpu creates its device:
 * - wgpu's WebGPU backend never asks for the 'subgroups' feature, yet cubecl's shaders start
 *   with `enable subgroups;` whenever the adapter has it; without the feature on the device
 *   Chrome rejects those shaders. Asking for it costs nothing, so it is asked for when offered.
 * - the device's `lost` promise is watched, so that a failure after a lost device (a driver
 *   reset, a destroyed device) is reported as what it is.
 */
export function watchDevices() {
  const proto = globalThis.GPUAdapter?.prototype;
  if (!proto || typeof proto.requestDevice !== 'function' || proto.requestDevice.phi2Patched) {
    return;
  }
  const original = proto.requestDevice;
  const requestDevice = async function (descriptor = {}) {
    let request = descriptor;
    if (this.features?.has('subgroups')) {
      const features = new Set(descriptor.requiredFeatures ?? []);
      features.add('subgroups');
      request = { ...descriptor, requiredFeatures: [...features] };
    }
    const device = await original.call(this, request);
    device.lost?.then((info) => {
      lostInfo = { reason: info.reason, message: info.message };
    });
    return device;
  };
  requestDevice.phi2Patched = true;
  proto.requestDevice = requestDevice;
}

/** `{reason, message}` once the engine's GPU device has been lost in this realm, else null. */
export function deviceLost() {
  return lostInfo;
}

/**
 * The engine's device description with the adapter's name in front. wgpu's WebGPU backend leaves
 * the name blank (the description then starts with its details, " (subgroups: …"); the browser's
 * GPUAdapterInfo has it. Unchanged on the CPU backend or where a name is already there.
 */
export function nameDevice(device, adapter) {
  if (!adapter || !device.startsWith(' ')) return device;
  const { description, vendor, architecture } = adapter.info ?? {};
  const name = description || [vendor, architecture].filter(Boolean).join(' ') || 'WebGPU adapter';
  return `${name}${device}`;
}

/**
 * The adapter, or null where there is no usable WebGPU. Asked for as wgpu asks for its own
 * (high performance), so that on a machine with two GPUs its features and limits are those of
 * the adapter the engine runs on.
 */
export async function gpuAdapter() {
  try {
    return (await globalThis.navigator?.gpu?.requestAdapter({ powerPreference: 'high-performance' })) ?? null;
  } catch {
    return null;
  }
}

/**
 * The backend `requested` ('auto', 'webgpu' or 'cpu') resolves to here, with its adapter.
 * @param {'auto' | 'webgpu' | 'cpu'} requested
 * @returns {Promise<{ backend: 'webgpu' | 'cpu', adapter: any }>}
 */
export async function chooseBackend(requested) {
  if (requested === 'cpu') return { backend: 'cpu', adapter: null };
  const adapter = await gpuAdapter();
  if (adapter) return { backend: 'webgpu', adapter };
  if (requested === 'webgpu') {
    throw new Phi2Error('UnsupportedError', 'this browser offers no WebGPU adapter; use backend "auto" or "cpu"');
  }
  return { backend: 'cpu', adapter: null };
}

/**
 * The `kernels` option checked against `adapter` (null: the CPU backend), with 'auto' made
 * explicit where the engine cannot see for itself: cubecl learns of subgroups through wgpu,
 * whose WebGPU backend does not map that feature, so in the browser 'auto' would never choose
 * them. A GPU with subgroups gets the subgroup kernels, as it does natively; a fallback
 * (software) adapter keeps 'auto', which the engine shapes for a CPU. "Fallback" is read where
 * wgpu reads it (`GPUAdapterInfo.isFallbackAdapter`), so both agree on what the adapter is.
 * 'subgroups' on an adapter without them would fail to compile mid-load: an OptionError now.
 */
export function resolveKernels(kernels, adapter) {
  if (!adapter) return kernels;
  const subgroups = adapter.features.has('subgroups');
  if (kernels === 'subgroups' && !subgroups) {
    throw new Phi2Error('OptionError', 'kernels "subgroups" needs a WebGPU adapter with the subgroups feature; this one has none', { option: 'kernels' });
  }
  if (kernels !== 'auto') return kernels;
  return subgroups && !adapter.info?.isFallbackAdapter ? 'subgroups' : 'auto';
}

/** The largest buffer a tensor may need on this adapter. */
export function maxBufferBytes(adapter) {
  const { maxBufferSize, maxStorageBufferBindingSize } = adapter.limits;
  return Math.min(maxBufferSize, maxStorageBufferBindingSize);
}
