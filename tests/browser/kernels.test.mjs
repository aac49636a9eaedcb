// What the `kernels` option becomes in the browser (pkg/src/webgpu.js): the headless Chromium of
// the other tests is a fallback adapter, so the GPU cases are checked here on adapter
// descriptions.
//
//   node --test tests/browser/kernels.test.mjs

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { nameDevice, resolveKernels } from '../../pkg/src/webgpu.js';

/** A GPUAdapter as far as resolveKernels looks: its features and what its info says. */
function adapter(features, info = { isFallbackAdapter: false }) {
  return { features: new Set(features), info };
}

test("'auto' runs the subgroup kernels on a GPU with subgroups, as natively", () => {
  assert.equal(resolveKernels('auto', adapter(['subgroups', 'shader-f16'])), 'subgroups');
});

test("'auto' stays 'auto' without subgroups, on a fallback adapter, and on the CPU", () => {
  assert.equal(resolveKernels('auto', adapter(['shader-f16'])), 'auto');
  assert.equal(resolveKernels('auto', adapter(['subgroups'], { isFallbackAdapter: true })), 'auto');
  assert.equal(resolveKernels('auto', null), 'auto');
});

test('an adapter is a fallback only where wgpu reads it (GPUAdapterInfo), so both agree', () => {
  // wgpu shapes the kernels for a CPU only from `info.isFallbackAdapter`; the older attribute on
  // the adapter itself does not make it one there, so it does not here either.
  const older = { ...adapter(['subgroups'], {}), isFallbackAdapter: true };
  assert.equal(resolveKernels('auto', older), 'subgroups');
});

test("an explicit choice is kept; 'subgroups' without them is an OptionError naming the option", () => {
  for (const kernels of ['portable', 'subgroups']) {
    assert.equal(resolveKernels(kernels, adapter(['subgroups'])), kernels);
    assert.equal(resolveKernels(kernels, null), kernels); // the CPU backend ignores it
  }
  assert.equal(resolveKernels('portable', adapter([], { isFallbackAdapter: true })), 'portable');
  assert.throws(
    () => resolveKernels('subgroups', adapter(['shader-f16'])),
    (error) => error.name === 'OptionError' && error.details?.option === 'kernels' && /subgroups/.test(error.message),
  );
});

test("the device description gets the adapter's name where wgpu leaves it blank", () => {
  const details = ' (subgroups: true, sizes 32-32; shader-f16: true)';
  const named = (info) => nameDevice(details, adapter([], info));
  assert.equal(named({ description: 'NVIDIA H200', vendor: 'nvidia' }), `NVIDIA H200${details}`);
  assert.equal(named({ description: '', vendor: 'google', architecture: 'swiftshader' }), `google swiftshader${details}`);
  assert.equal(named({}), `WebGPU adapter${details}`);
  // A name already there, and the CPU backend's description, stay as they are.
  assert.equal(nameDevice(`lavapipe${details}`, adapter([], { description: 'other' })), `lavapipe${details}`);
  assert.equal(nameDevice('cpu (burn-flex)', null), 'cpu (burn-flex)');
});
