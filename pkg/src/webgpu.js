// WebGPU facts the engine needs before burn creates its device.

/**
 * wgpu's WebGPU backend never asks for the 'subgroups' feature, yet cubecl's shaders start with
 * `enable subgroups;` whenever the adapter has it; without the feature on the device Chrome
 * rejects those shaders and the device is lost. Asking for it costs nothing, so every
 * requestDevice in this realm (window or worker) asks for it when the adapter offers it.
 */
export function requestSubgroupsWhenOffered() {
  const proto = globalThis.GPUAdapter?.prototype;
  if (!proto || typeof proto.requestDevice !== 'function' || proto.requestDevice.phi2Patched) {
    return;
  }
  const original = proto.requestDevice;
  const requestDevice = function (descriptor = {}) {
    if (!this.features?.has('subgroups')) return original.call(this, descriptor);
    const features = new Set(descriptor.requiredFeatures ?? []);
    features.add('subgroups');
    return original.call(this, { ...descriptor, requiredFeatures: [...features] });
  };
  requestDevice.phi2Patched = true;
  proto.requestDevice = requestDevice;
}

/** The adapter, or null where there is no usable WebGPU. */
export async function gpuAdapter() {
  try {
    return (await globalThis.navigator?.gpu?.requestAdapter()) ?? null;
  } catch {
    return null;
  }
}

/** The largest buffer a tensor may need on this adapter. */
export function maxBufferBytes(adapter) {
  const { maxBufferSize, maxStorageBufferBindingSize } = adapter.limits;
  return Math.min(maxBufferSize, maxStorageBufferBindingSize);
}
