// What `kernels: 'auto'` becomes in the browser (pkg/src/webgpu.js): the headless Chromium of the
// other tests is a fallback adapter, so the GPU cases are checked here on adapter descriptions.
//
//   node --test tests/browser/kernels.test.mjs

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { resolveKernels } from '../../pkg/src/webgpu.js';

/** A GPUAdapter as far as resolveKernels looks: its features and whether it is a fallback. */
function adapter(features, isFallbackAdapter, where = 'info') {
  const described = { features: new Set(features) };
  if (where === 'info') described.info = { isFallbackAdapter };
  else described.isFallbackAdapter = isFallbackAdapter; // browsers before GPUAdapterInfo had it
  return described;
}

test("'auto' runs the subgroup kernels on a GPU with subgroups, as natively", () => {
  assert.equal(resolveKernels('auto', adapter(['subgroups', 'shader-f16'], false)), 'subgroups');
  assert.equal(resolveKernels('auto', adapter(['subgroups'], false, 'adapter')), 'subgroups');
});

test("'auto' stays 'auto' without subgroups, on a fallback adapter, and on the CPU", () => {
  assert.equal(resolveKernels('auto', adapter(['shader-f16'], false)), 'auto');
  assert.equal(resolveKernels('auto', adapter(['subgroups'], true)), 'auto');
  assert.equal(resolveKernels('auto', adapter(['subgroups'], true, 'adapter')), 'auto');
  assert.equal(resolveKernels('auto', null), 'auto');
});

test('an explicit choice is kept', () => {
  for (const kernels of ['portable', 'subgroups']) {
    assert.equal(resolveKernels(kernels, adapter(['subgroups'], false)), kernels);
    assert.equal(resolveKernels(kernels, adapter([], true)), kernels);
  }
});
