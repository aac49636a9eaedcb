// End-to-end browser test: the wasm build, run by web/index.html on WebGPU in headless chromium,
// must generate exactly what the native CLI generates (greedy decoding) for the tiny fixture.
//
//   node --test tests/browser/          (from the repository root; `npm ci` in tests/ first)
//
// Needs, and FAILS (never skips) without:
//   - web/pkg/phi2_web.js  (wasm-bindgen --target web --out-dir web/pkg ...)
//   - the CLI: target/debug/phi2, or the path in PHI2_BIN
//   - tests/fixtures/phi-tok/ (the tiny random-weight Phi model)
//   - chromium at /usr/bin/chromium, or the path in CHROMIUM
// SwiftShader compiles shaders slowly, so the WebGPU run may take minutes on a 2-core machine.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, rmSync } from 'node:fs';
import { execFile, execFileSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer } from './server.mjs';
import { launchChromium, forwardPageLogs, waitForResult } from './browser.mjs';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const FIXTURE = 'tests/fixtures/phi-tok';
const PROMPT = 'Hello World';
const MAX_TOKENS = 16;
const WASM_GLUE = path.join(REPO, 'web', 'pkg', 'phi2_web.js');
const PHI2_BIN = process.env.PHI2_BIN || path.join(REPO, 'target', 'debug', 'phi2');
const PAGE_TIMEOUT_MS = 10 * 60 * 1000;

let server;
let browser;

before(async () => {
  server = await startServer({ root: REPO });
  browser = await launchChromium();
  process.stderr.write(`[browser test] serving ${REPO} at ${server.url}; chromium ${browser.version()}\n`);
});

after(async () => {
  await browser?.close();
  await server?.close();
});

function requireFile(file, what) {
  assert.ok(existsSync(file), `${what} is missing: ${file}`);
}

function requireWasmBuild() {
  requireFile(WASM_GLUE, 'the wasm build (run `wasm-bindgen --target web --out-dir web/pkg <phi2_web.wasm>`)');
}

/** Run the native CLI for the greedy reference; returns {prompt_ids, generated_ids, text}. */
function nativeReference(model = FIXTURE) {
  requireFile(PHI2_BIN, 'the phi2 CLI (build it with `cargo build`, or set PHI2_BIN)');
  const args = ['generate', '--model', model, '--prompt', PROMPT, '--max-tokens', String(MAX_TOKENS),
    '--temperature', '0', '--json', '--backend', 'cpu'];
  return new Promise((resolve, reject) => {
    execFile(PHI2_BIN, args, { cwd: REPO, timeout: 5 * 60 * 1000, maxBuffer: 16 << 20 }, (err, stdout, stderr) => {
      if (err) {
        reject(new Error(`${PHI2_BIN} ${args.join(' ')} failed: ${err.message}\nstderr:\n${stderr}`));
        return;
      }
      // One JSON object on stdout; tolerate stray lines around it by taking the last line that parses.
      const candidates = [stdout.trim(), ...stdout.trim().split('\n').reverse()];
      for (const c of candidates) {
        try {
          const v = JSON.parse(c);
          if (v && typeof v === 'object') return resolve(v);
        } catch { /* next */ }
      }
      reject(new Error(`the CLI did not print a JSON object; stdout:\n${stdout}\nstderr:\n${stderr}`));
    });
  });
}

function pageUrl(params) {
  return `${server.url}web/index.html?${new URLSearchParams(params)}`;
}

/** The page's greedy run of `model` (a repo-relative directory) on `backend` must equal the CLI's. */
async function expectSameAsNative(model, backend) {
  requireWasmBuild();
  requireFile(path.join(REPO, model), `the model ${model}`);
  const reference = await nativeReference(model);
  assert.ok(Array.isArray(reference.prompt_ids) && Array.isArray(reference.generated_ids),
    `unexpected CLI output: ${JSON.stringify(reference)}`);
  assert.equal(reference.generated_ids.length > 0, true, 'the CLI generated no tokens');

  const page = await browser.newPage();
  forwardPageLogs(page);
  try {
    const t0 = Date.now();
    await page.goto(pageUrl({ model: `../${model}/`, prompt: PROMPT, max: String(MAX_TOKENS), backend, autorun: '1' }));
    const { result, isError } = await waitForResult(page, PAGE_TIMEOUT_MS);
    process.stderr.write(`[browser test] ${model} on ${backend}: ${((Date.now() - t0) / 1000).toFixed(1)} s: ${JSON.stringify(result)}\n`);
    assert.equal(isError, false, `the page reported an error: ${result.error}`);
    assert.equal(result.backend, backend);
    assert.deepEqual(result.promptIds, reference.prompt_ids, 'prompt token ids differ from the CLI');
    assert.deepEqual(result.generatedIds, reference.generated_ids, 'generated token ids differ from the CLI');
    assert.equal(result.text, reference.text, 'generated text differs from the CLI');
  } finally {
    await page.close();
  }
}

/** Converts the fixture into a 4-bit bundle under target/ (served with the repository). */
function convertToBundle() {
  const out = path.join('target', 'browser-bundles', 'phi-tok-q4');
  rmSync(path.join(REPO, out), { recursive: true, force: true });
  execFileSync(PHI2_BIN, ['convert', '--from', FIXTURE, '--out', out, '--chunk-mb', '1'], { cwd: REPO });
  return out;
}

const TIMEOUT = { timeout: PAGE_TIMEOUT_MS + 6 * 60 * 1000 };

test('wasm on WebGPU generates exactly what the native CLI generates (greedy, 16 tokens)', TIMEOUT,
  () => expectSameAsNative(FIXTURE, 'webgpu'));

test('a 4-bit bundle on WebGPU (custom kernel, no shader-f16) generates what the CLI does', TIMEOUT,
  () => expectSameAsNative(convertToBundle(), 'webgpu'));

test('the CPU backend in wasm generates what the CLI does, for checkpoints and bundles', TIMEOUT,
  async () => {
    await expectSameAsNative(FIXTURE, 'cpu');
    await expectSameAsNative(convertToBundle(), 'cpu');
  });

test('a model URL that does not exist gives a clear error on the page', { timeout: 3 * 60 * 1000 }, async () => {
  requireWasmBuild();
  const page = await browser.newPage();
  forwardPageLogs(page);
  try {
    await page.goto(pageUrl({ model: '../tests/fixtures/does-not-exist/', prompt: PROMPT, max: '4', backend: 'webgpu', autorun: '1' }));
    const { result, isError } = await waitForResult(page, 2 * 60 * 1000);
    assert.equal(isError, true, `expected an error, got ${JSON.stringify(result)}`);
    assert.equal(typeof result.error, 'string');
    assert.match(result.error, /config\.json|does-not-exist/,
      `the error should name config.json or the URL: ${result.error}`);
    // The status line shows it to a person too.
    const status = await page.textContent('#status');
    assert.match(status, /config\.json|does-not-exist/, `status line: ${status}`);
  } finally {
    await page.close();
  }
});
