// WebGPU facts the engine needs before burn creates its device.

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

/** The adapter, or null where there is no usable WebGPU. */
export async function gpuAdapter() {
  try {
    return (await globalThis.navigator?.gpu?.requestAdapter()) ?? null;
  } catch {
    return null;
  }
}

/**
 * The `kernels` option with 'auto' made explicit where the engine cannot see for itself: cubecl
 * learns of subgroups through wgpu, whose WebGPU backend does not map that feature, so in the
 * browser 'auto' would never choose them. A GPU with subgroups gets the subgroup kernels, as it
 * does natively; a fallback (software) adapter keeps 'auto', which the engine shapes for a CPU.
 */
export function resolveKernels(kernels, adapter) {
  if (kernels !== 'auto' || !adapter) return kernels;
  const fallback = adapter.info?.isFallbackAdapter ?? adapter.isFallbackAdapter ?? false;
  return adapter.features.has('subgroups') && !fallback ? 'subgroups' : 'auto';
}

/** The largest buffer a tensor may need on this adapter. */
export function maxBufferBytes(adapter) {
  const { maxBufferSize, maxStorageBufferBindingSize } = adapter.limits;
  return Math.min(maxBufferSize, maxStorageBufferBindingSize);
}
