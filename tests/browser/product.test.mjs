// End-to-end tests of what users touch, in both browser engines here (browser.mjs): headless
// Chromium with WebGPU on SwiftShader and headless Firefox with WebGPU on lavapipe. Each runs the
// wasm export, the npm package (worker and calling-thread engines), the demo page, caching,
// offline use, Stop/abort, typed errors, a lost device, the bench page and the CPU fallback;
// Firefox also f16. Chromium alone runs the bundler build (the typings need no browser).
// Greedy outputs must equal the native CLI's on the same model.
//
//   node --test tests/browser/          (from the repository root; `npm ci` in tests/ first)
//
// Needs, and FAILS (never skips) without: pkg/dist and web/pkg (scripts/build-pkg.sh), the CLI
// (target/debug/phi2 or PHI2_BIN), tests/fixtures/phi-tok, chromium (/usr/bin/chromium or
// CHROMIUM), firefox-esr (/usr/bin/firefox-esr or FIREFOX), and for the f16 reference lavapipe
// (mesa-vulkan-drivers). The tests share one server, one browser per engine and one converted
// bundle, and run in order.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { execFile, execFileSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer } from './server.mjs';
import { ENGINES, launchBrowser, forwardPageLogs, pageText, waitForResult } from './browser.mjs';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const TESTS = path.join(REPO, 'tests');
const FIXTURE = 'tests/fixtures/phi-tok';
const BUNDLE = 'target/browser-bundles/phi-tok-q4';
/** The same bundle with one byte of a chunk flipped on the server. */
const CORRUPT_BUNDLE = 'target/browser-bundles/phi-tok-q4-corrupt';
/** 4-bit bundles of the other fixtures with a tokenizer: odd shapes (phi-odd: 48 columns, a
 * block and a half) and wider layers (phi-80), for the CPU backend's kernel in wasm. */
const SHAPE_FIXTURES = ['phi-odd', 'phi-80'];
/** A prompt in their 512- and 1024-token vocabularies. */
const SHAPE_PROMPT = '1+2=';
const shapeBundle = (fixture) => `target/browser-bundles/${fixture}-q4`;
const PROMPT = 'Hello World';
const MAX_TOKENS = 16;
const PHI2_BIN = process.env.PHI2_BIN || path.join(REPO, 'target', 'debug', 'phi2');
const PAGE_TIMEOUT_MS = 8 * 60 * 1000;
const TIMEOUT = { timeout: 15 * 60 * 1000 };

let server;
/** One browser per engine, by name. */
const browsers = {};
const native = {};

function requireFile(file, what) {
  assert.ok(existsSync(path.resolve(REPO, file)), `${what} is missing: ${file}`);
}

/** The chat request the browser and the CLI both answer. */
const CHAT_REQUEST = { messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: PROMPT }], max_tokens: MAX_TOKENS };

/** The CLI's answer to a chat completion request (`phi2 chat`), on the CPU. */
function nativeChat(model, request) {
  const file = path.join(REPO, 'target', 'browser-chat-request.json');
  writeFileSync(file, JSON.stringify(request));
  const out = execFileSync(PHI2_BIN, ['chat', '--model', model, '--backend', 'cpu', '--request', file], { cwd: REPO });
  return JSON.parse(out.toString());
}

/**
 * The CLI's greedy run: {prompt_ids, generated_ids, text}. On the CPU by default; `gpu` runs it
 * on lavapipe (Vulkan) with those extra options.
 */
function nativeGenerate(model, { gpu, prompt = PROMPT } = {}) {
  const args = ['generate', '--model', model, '--prompt', prompt, '--max-tokens', String(MAX_TOKENS),
    '--temperature', '0', '--json', '--backend', gpu ? 'wgpu' : 'cpu', ...(gpu ?? [])];
  const env = { ...process.env };
  if (gpu) {
    const icds = '/usr/share/vulkan/icd.d';
    const lavapipe = existsSync(icds) && readdirSync(icds).find((file) => file.startsWith('lvp_icd'));
    assert.ok(lavapipe, `lavapipe is missing from ${icds} (apt-get install -y mesa-vulkan-drivers)`);
    env.VK_ICD_FILENAMES = path.join(icds, lavapipe);
  }
  return new Promise((resolve, reject) => {
    execFile(PHI2_BIN, args, { cwd: REPO, env, timeout: 5 * 60 * 1000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`${PHI2_BIN} ${args.join(' ')} failed: ${err.message}\n${stderr}`));
      resolve(JSON.parse(stdout.trim().split('\n').pop()));
    });
  });
}

before(async () => {
  requireFile('pkg/dist/index.js', 'the package build (run scripts/build-pkg.sh)');
  requireFile('web/pkg/wasm/phi2_web_bg.wasm', 'the demo page copy of the package (scripts/build-pkg.sh)');
  requireFile(PHI2_BIN, 'the phi2 CLI (cargo build, or set PHI2_BIN)');
  rmSync(path.join(REPO, BUNDLE), { recursive: true, force: true });
  execFileSync(PHI2_BIN, ['convert', '--from', FIXTURE, '--out', BUNDLE, '--chunk-mb', '1'], { cwd: REPO });
  rmSync(path.join(REPO, CORRUPT_BUNDLE), { recursive: true, force: true });
  cpSync(path.join(REPO, BUNDLE), path.join(REPO, CORRUPT_BUNDLE), { recursive: true });
  const corrupt = path.join(REPO, CORRUPT_BUNDLE, 'chunk-00001.bin');
  const bytes = readFileSync(corrupt);
  bytes[100] ^= 0x40;
  writeFileSync(corrupt, bytes);
  native.checkpoint = await nativeGenerate(FIXTURE);
  native.bundle = await nativeGenerate(BUNDLE);
  // What Firefox's f16 run must match: the same kernels with f16 products and KV cache on an
  // f16 adapter, lavapipe, which Firefox's WebGPU also runs on.
  native.f16 = await nativeGenerate(BUNDLE, { gpu: ['--f16', '--kernels', 'portable'] });
  native.chat = await nativeChat(BUNDLE, CHAT_REQUEST);
  for (const fixture of SHAPE_FIXTURES) {
    rmSync(path.join(REPO, shapeBundle(fixture)), { recursive: true, force: true });
    execFileSync(PHI2_BIN, ['convert', '--from', `tests/fixtures/${fixture}`, '--out', shapeBundle(fixture)], { cwd: REPO });
    native[fixture] = await nativeGenerate(shapeBundle(fixture), { prompt: SHAPE_PROMPT });
  }
  assert.ok(native.bundle.generated_ids.length > 0, 'the CLI generated nothing');
  server = await startServer({ root: REPO });
  for (const engine of ENGINES) {
    browsers[engine] = await launchBrowser(engine);
    process.stderr.write(`[browser test] ${engine} ${browsers[engine].version}\n`);
  }
  process.stderr.write(`[browser test] serving ${REPO} at ${server.url}\n`);
});

after(async () => {
  for (const browser of Object.values(browsers)) await browser.close();
  await server?.close();
});

/** Runs `run(engine, context)` in a fresh context of each engine, as a subtest per engine. */
async function inEachEngine(t, run) {
  for (const engine of ENGINES) {
    await t.test(engine, TIMEOUT, async () => {
      const context = await browsers[engine].newContext();
      try {
        await run(engine, context);
      } finally {
        await context.close();
      }
    });
  }
}

async function withPage(context, run) {
  const page = await context.newPage();
  forwardPageLogs(page, context.engine ?? 'page');
  try {
    return await run(page);
  } finally {
    await page.close();
  }
}

/** Opens `url` and returns the page's #result (after autorun). */
async function pageResult(page, url) {
  const started = Date.now();
  await page.goto(url);
  const { result, isError } = await waitForResult(page, PAGE_TIMEOUT_MS);
  process.stderr.write(`[browser test] ${url} (${((Date.now() - started) / 1000).toFixed(1)} s): ${JSON.stringify(result).slice(0, 400)}\n`);
  return { result, isError };
}

const demoUrl = (params) => `${server.url}web/index.html?${new URLSearchParams({ prompt: PROMPT, max: String(MAX_TOKENS), autorun: '1', ...params })}`;
const bundleUrl = `../${BUNDLE}/`;
const chunkRequests = (from) => server.requests.slice(from).filter((r) => /chunk-\d+\.bin/.test(r.path));

function assertSameAsNative(result, reference, what) {
  assert.deepEqual(result.generatedIds, reference.generated_ids, `${what}: token ids differ from the CLI`);
  assert.equal(result.text, reference.text, `${what}: text differs from the CLI`);
}

function assertProgress(progress, { fromCache }) {
  assert.ok(progress.length > 0, 'no progress events');
  const { totalBytes, chunks } = progress[0];
  assert.ok(totalBytes > 0 && chunks > 1, `totals: ${JSON.stringify(progress[0])}`);
  let last = { loadedBytes: 0 };
  const lastChunk = {};
  for (const event of progress) {
    assert.ok(event.loadedBytes >= last.loadedBytes, `loadedBytes went back: ${JSON.stringify([last, event])}`);
    assert.ok(event.loadedBytes <= totalBytes && event.totalBytes === totalBytes && event.chunks === chunks);
    assert.ok(event.chunk >= (lastChunk[event.phase] ?? 0), `chunk count went back in ${event.phase}`);
    lastChunk[event.phase] = event.chunk;
    last = event;
  }
  assert.equal(last.loadedBytes, totalBytes, 'progress did not reach the total');
  assert.equal(last.phase, 'compile');
  assert.equal(lastChunk.upload, chunks, 'not every chunk was uploaded');
  const arrivals = progress.filter((e) => e.phase === 'download' || e.phase === 'cache');
  assert.ok(arrivals.every((e) => e.phase === (fromCache ? 'cache' : 'download')),
    `expected every chunk from the ${fromCache ? 'cache' : 'network'}`);
}

test('the wasm export (for await over generate) on a checkpoint and a bundle equals the CLI, on WebGPU and CPU', TIMEOUT, (t) => inEachEngine(t, async (engine, context) => {
    for (const [model, reference] of [[FIXTURE, native.checkpoint], [BUNDLE, native.bundle]]) {
      for (const backend of ['webgpu', 'cpu']) {
        const url = `${server.url}tests/browser/pages/checkpoint.html?${new URLSearchParams({ model: `../../../${model}/`, backend, prompt: PROMPT, max: String(MAX_TOKENS) })}`;
        const { result, isError } = await withPage(context, (page) => pageResult(page, url));
        assert.equal(isError, false, JSON.stringify(result.error));
        assert.equal(result.backend, backend);
        assert.deepEqual(result.promptIds, reference.prompt_ids);
        assertSameAsNative(result, reference, `${model} on ${backend}`);
        assert.equal(result.stats.generatedTokens, reference.generated_ids.length);
        assert.equal(result.stats.promptTokens, reference.prompt_ids.length);
        assert.ok(result.stats.timeToFirstTokenMs > 0 && result.stats.decodeTokensPerS > 0, JSON.stringify(result.stats));
      }
    }
}));

test('the bench page measures the tiny bundle on WebGPU with the portable kernels (a smoke run: figures present, no timing asserted)', TIMEOUT, (t) => inEachEngine(t, async (engine, context) => {
    const url = `${server.url}web/bench.html?${new URLSearchParams({ model: bundleUrl, backend: 'webgpu', kernels: 'portable', prompt: '8', gen: '4', copy: '4', autorun: '1' })}`;
    const { result, isError } = await withPage(context, (page) => pageResult(page, url));
    assert.equal(isError, false, JSON.stringify(result.error));
    assert.equal(result.backend, 'webgpu');
    assert.equal(result.promptTokens, 8);
    assert.equal(result.generatedTokens, 4);
    for (const key of ['loadMs', 'timeToFirstTokenS', 'prefillTokensPerS', 'decodeTokensPerS', 'launchesPerToken',
      'weightBytesPerToken', 'decodeEffectiveGbPerS', 'copyGbPerS', 'bandwidthRatio', 'wasmMemoryBytes',
      'prefillDecodeRatio', 'prefillGmacPerS', 'peakGmacPerS', 'prefillPeakShare', 'prefillDecodeCeiling']) {
      assert.ok(Number.isFinite(result[key]) && result[key] > 0, `${key}: ${result[key]}`);
    }
    // A prefill cannot multiply-add faster than registers alone.
    assert.ok(result.prefillPeakShare < 1, `prefill / multiply-add rate: ${result.prefillPeakShare}`);
    assert.equal(result.copyBytes, 4 * 2 ** 20);
    assert.match(result.device, /subgroups: (true|false)/);
    assert.match(result.device, /kernels: a workgroup per 8 output rows reduced in workgroup memory,/);
    assert.match(result.device, /^\S/, 'the device description starts with the adapter\'s name');
}));

/**
 * What each engine's adapter gets by default, and the other kernels its second visit runs:
 * SwiftShader (Chromium) is a fallback adapter with subgroups of one size, so by default it gets
 * the kernels shaped for a CPU with their activation loads shared across a subgroup, and it can
 * run the kernels a GPU with subgroups gets (cubecl does not offer them on a fallback adapter),
 * so the browser's shader compiler checks them too (their barriers and subgroup operations
 * under WGSL's uniformity rules). Firefox's lavapipe adapter is a fallback
 * without subgroups: the CPU-shaped kernels without shared loads, and 'portable' is the other.
 */
const KERNELS_BY_ENGINE = {
  chromium: {
    auto: /software adapter: true; kernels: a thread per 16 output rows, activation loads shared across a subgroup/,
    other: ['subgroups', /kernels: a workgroup per 8 output rows reduced through subgroups,/],
  },
  firefox: {
    auto: /subgroups: false,.*software adapter: true; kernels: a thread per 16 output rows, f16/,
    other: ['portable', /kernels: a workgroup per 8 output rows reduced in workgroup memory,/],
  },
};

test('the demo page loads a bundle through the worker with progress, matches the CLI, then loads from cache (with other kernels) and offline', TIMEOUT, (t) => inEachEngine(t, async (engine, context) => {
    const kernels = KERNELS_BY_ENGINE[engine];
    // First visit: everything from the network.
    let mark = server.requests.length;
    const first = await withPage(context, async (page) => {
      const outcome = await pageResult(page, demoUrl({ model: bundleUrl, backend: 'webgpu' }));
      await page.evaluate(() => navigator.serviceWorker.ready.then(() => true)); // the app shell is cached
      return outcome;
    });
    assert.equal(first.isError, false, JSON.stringify(first.result.error));
    assert.equal(first.result.backend, 'webgpu');
    assertSameAsNative(first.result, native.bundle, 'demo page, first load');
    assertProgress(first.result.progress, { fromCache: false });
    assert.equal(chunkRequests(mark).length, first.result.progress[0].chunks);
    assert.equal(first.result.stats.stopReason, 'length');
    assert.match(first.result.info.device, kernels.auto);

    // Second visit: no chunk is requested again, and the other kernels give the same tokens.
    mark = server.requests.length;
    const [other, otherDevice] = kernels.other;
    const second = await withPage(context, (page) => pageResult(page, demoUrl({ model: bundleUrl, backend: 'webgpu', kernels: other })));
    assert.equal(second.isError, false, JSON.stringify(second.result.error));
    assert.match(second.result.info.device, otherDevice);
    assertSameAsNative(second.result, native.bundle, `demo page, from cache, ${other} kernels`);
    assertProgress(second.result.progress, { fromCache: true });
    assert.deepEqual(chunkRequests(mark), [], 'a cached load requested chunks');

    // Offline: the browser is offline and the server is gone; the service worker serves the
    // page and the package serves the model from its cache.
    const port = server.port;
    await server.close();
    await context.setOffline(true);
    try {
      const offline = await withPage(context, (page) => pageResult(page, demoUrl({ model: bundleUrl, backend: 'webgpu' })));
      assert.equal(offline.isError, false, JSON.stringify(offline.result.error));
      assertSameAsNative(offline.result, native.bundle, 'demo page, offline');
    } finally {
      await context.setOffline(false);
      server = await startServer({ root: REPO, port });
    }
}));

test('abort(), stop() and break end a generation at once, on both backends, in worker and page modes', TIMEOUT, async (t) => {
  // The CPU backend with this tiny model makes tokens faster than a message round trip, so a
  // worker that was not held back ran through the whole budget before a stop reached it.
  // The worker may run this many tokens ahead of its consumer (pkg/src/worker.js).
  const TOKENS_AHEAD = 4;
  await inEachEngine(t, async (engine, context) => {
    for (const backend of ['cpu', 'webgpu']) {
      for (const worker of [true, false]) {
        const outcome = await withPage(context, async (page) => {
          await page.goto(`${server.url}web/index.html`);
          return page.evaluate(async ({ url, prompt, worker, backend }) => {
            // Counts the tokens the engine's worker sends, stopped or not.
            let tokenMessages = 0;
            const PageWorker = globalThis.Worker;
            globalThis.Worker = class extends PageWorker {
              constructor(...args) {
                super(...args);
                this.addEventListener('message', ({ data }) => {
                  if (data.type === 'item') tokenMessages += 1;
                });
              }
            };
            const { Phi2 } = await import(new URL('pkg/index.js', location.href).href);
            const model = await Phi2.load(url, { worker, backend, cache: false });
            const run = async (options, onToken) => {
              const sentBefore = tokenMessages;
              const ids = [];
              for await (const token of model.generate(prompt, options)) {
                ids.push(token.tokenId);
                if (onToken?.(ids.length)) break;
              }
              return { ids, stats: model.stats, sent: tokenMessages - sentBefore };
            };
            const controller = new AbortController();
            const aborted = await run({ maxTokens: 40, signal: controller.signal }, (n) => {
              if (n === 3) controller.abort();
            });
            const stopped = await run({ maxTokens: 40 }, (n) => {
              if (n === 2) model.stop();
            });
            const broken = await run({ maxTokens: 40 }, (n) => n === 4);
            const after = await run({ maxTokens: 16 });
            // A generation whose consumer just stops iterating (no break) does not hold up the
            // next call, which ends it.
            const abandoned = model.generate(prompt, { maxTokens: 40 });
            await abandoned.next();
            const next = await run({ maxTokens: 16 });
            await model.unload();
            return { aborted, stopped, broken, after, next };
          }, { url: bundleUrl, prompt: PROMPT, worker, backend });
        });
        const what = `${engine}, ${backend}, worker ${worker}`;
        process.stderr.write(`[browser test] stop/abort (${what}): ${JSON.stringify(outcome)}\n`);
        const { aborted, stopped, broken, after, next } = outcome;
        for (const [name, run, received] of [['abort()', aborted, 3], ['stop()', stopped, 2], ['break', broken, 4]]) {
          assert.equal(run.ids.length, received, `${what}: ${name} after token ${received} still yielded ${JSON.stringify(run)}`);
          assert.equal(run.stats.generatedTokens, received, `${what}: ${name}: stats ${JSON.stringify(run.stats)}`);
          assert.equal(run.stats.stopReason, 'cancelled', `${what}: ${name}: stats ${JSON.stringify(run.stats)}`);
          if (worker) {
            // The worker stopped computing within its look-ahead instead of finishing the 40.
            assert.ok(run.sent <= received + TOKENS_AHEAD, `${what}: ${name}: the worker sent ${run.sent} tokens`);
          }
        }
        assert.deepEqual(after.ids, native.bundle.generated_ids, `${what}: after stops the model must generate as before`);
        assert.deepEqual(next.ids, native.bundle.generated_ids, `${what}: after an abandoned generation`);
        assert.equal(after.stats.reusedTokens, native.bundle.prompt_ids.length - 1, `${what}: the same prompt reuses its cache`);
      }
    }
  });
});

test('bad input gives typed errors (name, message, details) that cross the worker boundary', TIMEOUT, (t) => inEachEngine(t, async (engine, context) => {
    const errors = await withPage(context, async (page) => {
      await page.goto(`${server.url}web/index.html`);
      return page.evaluate(async ({ bundle, corruptBundle }) => {
        const { Phi2, Phi2Error } = await import(new URL('pkg/index.js', location.href).href);
        const caught = async (what, run) => {
          try {
            await run();
            return { what, thrown: false };
          } catch (e) {
            return { what, thrown: true, typed: e instanceof Phi2Error, name: e.name, message: e.message, details: e.details };
          }
        };
        const drain = async (iterator) => {
          for await (const token of iterator) void token;
        };
        const out = [];
        out.push(await caught('missing bundle', () => Phi2.load('../tests/fixtures/does-not-exist/')));
        out.push(await caught('not a bundle', () => Phi2.load('../tests/fixtures/phi-tok/config.json')));
        // A chunk that fails its sha256 from the network, and again when fetched once more.
        out.push(await caught('corrupt chunk', () => Phi2.load(corruptBundle, { cache: false })));
        out.push(await caught('bad backend', () => Phi2.load(bundle, { backend: 'tpu' })));
        out.push(await caught('bad kernels', () => Phi2.load(bundle, { kernels: 'fast' })));
        out.push(await caught('bad threads', () => Phi2.load(bundle, { backend: 'cpu', threads: 0 })));
        out.push(await caught('generate before load', () => drain(new Phi2().generate('hi'))));
        const model = await Phi2.load(bundle);
        out.push(await caught('temperature', () => drain(model.generate('hi', { temperature: -1 }))));
        out.push(await caught('maxTokens', () => drain(model.generate('hi', { maxTokens: 'many' }))));
        out.push(await caught('unknown option', () => drain(model.generate('hi', { temprature: 1 }))));
        out.push(await caught('prompt type', () => drain(model.generate(42))));
        await model.unload();
        out.push(await caught('after unload', () => drain(model.generate('hi'))));
        // A device whose buffers are smaller than the bundle's tensors (limits patched).
        const local = await Phi2.load(bundle, { worker: false, cache: false });
        await local.unload();
        const limits = Object.getOwnPropertyDescriptor(GPUAdapter.prototype, 'limits');
        Object.defineProperty(GPUAdapter.prototype, 'limits', {
          configurable: true,
          get() {
            return { maxBufferSize: 4096, maxStorageBufferBindingSize: 4096 };
          },
        });
        out.push(await caught('buffer limits', () => Phi2.load(bundle, { worker: false, cache: false })));
        Object.defineProperty(GPUAdapter.prototype, 'limits', limits);
        // An adapter without subgroups asked for subgroup kernels (features patched).
        const features = Object.getOwnPropertyDescriptor(GPUAdapter.prototype, 'features');
        Object.defineProperty(GPUAdapter.prototype, 'features', { configurable: true, get: () => new Set() });
        out.push(await caught('subgroups missing', () => Phi2.load(bundle, { worker: false, cache: false, kernels: 'subgroups' })));
        Object.defineProperty(GPUAdapter.prototype, 'features', features);
        return out;
      }, { bundle: bundleUrl, corruptBundle: `../${CORRUPT_BUNDLE}/` });
    });
    process.stderr.write(`[browser test] errors: ${JSON.stringify(errors, null, 1)}\n`);
    const expect = {
      'missing bundle': ['LoadError', /does-not-exist/, { file: /does-not-exist\/manifest\.json/ }],
      'not a bundle': ['FormatError', /config\.json/, { file: /config\.json/ }],
      'corrupt chunk': ['IntegrityError', /chunk-00001\.bin.*sha256|sha256.*chunk-00001\.bin/, { file: /phi-tok-q4-corrupt\/chunk-00001\.bin$/, chunk: /^1$/ }],
      'bad backend': ['OptionError', /tpu/, { option: /^backend$/ }],
      'bad kernels': ['OptionError', /fast/, { option: /^kernels$/ }],
      'bad threads': ['OptionError', /threads 0/, { option: /^threads$/ }],
      'subgroups missing': ['OptionError', /subgroups feature/, { option: /^kernels$/ }],
      'generate before load': ['StateError', /Phi2\.load/, {}],
      temperature: ['OptionError', /-1/, { option: /^temperature$/ }],
      maxTokens: ['OptionError', /many/, { option: /^maxTokens$/ }],
      'unknown option': ['OptionError', /temprature/, { option: /^temprature$/ }],
      'prompt type': ['OptionError', /prompt/, { option: /^prompt$/ }],
      'after unload': ['StateError', /unloaded/, {}],
      'buffer limits': ['DeviceError', /4096/, { tensor: /^attention scores$/, limit: /^4096$/ }],
    };
    for (const error of errors) {
      const [name, message, details] = expect[error.what];
      assert.ok(error.thrown && error.typed, `${error.what}: ${JSON.stringify(error)}`);
      assert.equal(error.name, name, `${error.what}: ${JSON.stringify(error)}`);
      assert.match(error.message, message, error.what);
      for (const [key, pattern] of Object.entries(details)) {
        assert.match(String(error.details?.[key]), pattern, `${error.what}: details.${key}`);
      }
    }
    assert.equal(errors.length, Object.keys(expect).length);

    // The page shows a load error in words.
    await withPage(context, async (page) => {
      const { result, isError } = await pageResult(page, demoUrl({ model: '../tests/fixtures/does-not-exist/' }));
      assert.equal(isError, true);
      assert.equal(result.error.name, 'LoadError');
      const shown = await pageText(page, '#error');
      assert.match(shown, /does-not-exist/, `the error box says: ${shown}`);
    });
}));

test('a lost GPU device ends generation with a DeviceError, and a new load works', TIMEOUT, (t) => inEachEngine(t, async (engine, context) => {
    const outcome = await withPage(context, async (page) => {
      await page.goto(`${server.url}web/bench.html`);
      return page.evaluate(async ({ url, prompt }) => {
        // Keep the devices this page creates, to lose one on purpose.
        const devices = [];
        const original = GPUAdapter.prototype.requestDevice;
        GPUAdapter.prototype.requestDevice = async function (descriptor) {
          const device = await original.call(this, descriptor);
          devices.push(device);
          return device;
        };
        const { Phi2 } = await import(new URL('pkg/index.js', location.href).href);
        const describe = (e) => ({ name: e.name, message: e.message, details: e.details });
        const model = await Phi2.load(url, { worker: false, cache: false, backend: 'webgpu' });
        const ids = [];
        let error = null;
        try {
          for await (const token of model.generate(prompt, { maxTokens: 8 })) {
            ids.push(token.tokenId);
            if (ids.length === 2) devices.at(-1).destroy();
          }
        } catch (e) {
          error = describe(e);
        }
        // On this page's thread the device cannot come back: a load says so at once.
        let again = null;
        try {
          await Phi2.load(url, { worker: false, cache: false, backend: 'webgpu' });
        } catch (e) {
          again = describe(e);
        }
        // A load in worker mode (the default) starts afresh.
        const fresh = await Phi2.load(url, { backend: 'webgpu', cache: false });
        const freshIds = [];
        for await (const token of fresh.generate(prompt, { maxTokens: 16 })) freshIds.push(token.tokenId);
        await fresh.unload();
        return { ids, error, again, freshIds };
      }, { url: bundleUrl, prompt: PROMPT });
    });
    process.stderr.write(`[browser test] device lost: ${JSON.stringify(outcome)}\n`);
    assert.equal(outcome.ids.length, 2, 'generation must end at the loss');
    assert.equal(outcome.error?.name, 'DeviceError', JSON.stringify(outcome.error));
    assert.match(outcome.error.message, /GPU device was lost/);
    assert.equal(outcome.again?.name, 'DeviceError', JSON.stringify(outcome.again));
    assert.deepEqual(outcome.freshIds, native.bundle.generated_ids.slice(0, 16));
}));

test('without WebGPU the same API runs on the CPU in wasm and generates the same tokens', TIMEOUT, async (t) => {
  for (const engine of ENGINES) {
    await t.test(engine, TIMEOUT, async () => {
      const noGpu = await launchBrowser(engine, { webgpu: false });
      try {
        const context = await noGpu.newContext();
        const { result, isError, hasWebGPU, body } = await withPage(context, async (page) => {
          const outcome = await pageResult(page, demoUrl({ model: bundleUrl, backend: 'auto' }));
          const hasWebGPU = await page.evaluate(async () => (await import(new URL('pkg/index.js', location.href).href)).Phi2.hasWebGPU());
          return { ...outcome, hasWebGPU, body: await pageText(page, 'body') };
        });
        assert.equal(isError, false, JSON.stringify(result.error));
        assert.equal(hasWebGPU, false);
        assert.equal(result.backend, 'cpu');
        // 'auto' became the CPU: one thread here (the page is not isolated), and it says why.
        assert.equal(result.info.threads, 1);
        assert.ok(result.info.warnings.some((w) => /one thread: the page is not cross-origin isolated/.test(w)), JSON.stringify(result.info.warnings));
        assertSameAsNative(result, native.bundle, `${engine}: CPU fallback`);
        assert.match(body, /CPU/, 'the page says it runs on the CPU');
      } finally {
        await noGpu.close();
      }
    });
  }
});

test('the demo page gets cross-origin isolation from its service worker; the CPU backend then gives the CLI\'s tokens on one and on two threads, on every fixture with a tokenizer', TIMEOUT, (t) => inEachEngine(t, async (engine, context) => {
  await withPage(context, async (page) => {
    // The first visit is served before the service worker controls the page: one thread.
    const first = await pageResult(page, demoUrl({ model: bundleUrl, backend: 'cpu', threads: '2' }));
    assert.equal(first.isError, false, JSON.stringify(first.result.error));
    assert.equal(first.result.info.threads, 1);
    assert.ok(first.result.info.warnings.some((w) => /one thread: the page is not cross-origin isolated/.test(w)),
      `no warning says why: ${JSON.stringify(first.result.info.warnings)}`);
    assertSameAsNative(first.result, native.bundle, `${engine}: CPU, one thread`);
    await page.evaluate(() => navigator.serviceWorker.ready);
    const models = [
      [bundleUrl, PROMPT, native.bundle],
      ...SHAPE_FIXTURES.map((f) => [`../${shapeBundle(f)}/`, SHAPE_PROMPT, native[f]]),
    ];
    for (const [model, prompt, reference] of models) {
      for (const threads of [1, 2]) {
        const { result, isError } = await pageResult(page, demoUrl({ model, prompt, backend: 'cpu', threads: String(threads) }));
        assert.equal(await page.evaluate(() => crossOriginIsolated), true, 'the service worker did not isolate the page');
        assert.equal(isError, false, JSON.stringify(result.error));
        assert.equal(result.info.threads, threads);
        assert.deepEqual(result.info.warnings.filter((w) => /thread/.test(w)), []);
        assertSameAsNative(result, reference, `${engine}: ${model} on the CPU, ${threads} threads`);
      }
    }
  });
}));

test('Firefox with f16: the f16 products and KV cache give the CLI\'s f16 tokens on lavapipe', TIMEOUT, async () => {
  // Chromium's SwiftShader has no shader-f16: only Firefox (lavapipe) runs the f16 kernels.
  const context = await browsers.firefox.newContext();
  try {
    const outcome = await withPage(context, async (page) => {
      await page.goto(`${server.url}web/index.html`);
      return page.evaluate(async ({ url, prompt }) => {
        const { Phi2 } = await import(new URL('pkg/index.js', location.href).href);
        const model = await Phi2.load(url, { cache: false, kernels: 'portable', f16: true });
        const ids = [];
        for await (const token of model.generate(prompt, { maxTokens: 16 })) ids.push(token.tokenId);
        const device = model.info.device;
        await model.unload();
        return { ids, device };
      }, { url: bundleUrl, prompt: PROMPT });
    });
    process.stderr.write(`[browser test] firefox f16: ${JSON.stringify(outcome)}; CLI --f16 on lavapipe: ${JSON.stringify(native.f16.generated_ids)}\n`);
    assert.match(outcome.device, /shader-f16: true;.*f16 products and KV cache: true/, 'f16 must be in use');
    assert.deepEqual(outcome.ids, native.f16.generated_ids, 'f16 token ids differ from the CLI\'s f16 run on lavapipe');
  } finally {
    await context.close();
  }
});

test('OpenAI-style chat completions: streamed chunks, the CLI\'s answer, constrained JSON, a reused cache', TIMEOUT, (t) => inEachEngine(t, async (engine, context) => {
  const outcome = await withPage(context, async (page) => {
    await page.goto(`${server.url}web/index.html`);
    return page.evaluate(async ({ url, request }) => {
      const { Phi2 } = await import(new URL('pkg/index.js', location.href).href);
      const model = await Phi2.load(url, { cache: false });
      const create = (body) => model.chat.completions.create(body);
      const whole = await create(request);
      const chunks = [];
      for await (const chunk of await create({ ...request, stream: true, stream_options: { include_usage: true } })) {
        chunks.push(chunk);
      }
      const schema = {
        type: 'object',
        properties: { name: { type: 'string', maxLength: 10 }, n: { type: 'integer', minimum: 0, maximum: 99 } },
        required: ['name', 'n'],
        additionalProperties: false,
      };
      const constrained = [];
      for (const seed of [1, 2, 3]) {
        const reply = await create({
          messages: [{ role: 'user', content: 'A name and a number, as JSON.' }],
          max_tokens: 60, temperature: 1, seed,
          response_format: { type: 'json_schema', json_schema: { name: 'pair', schema } },
        });
        constrained.push({ content: reply.choices[0].message.content, finish: reply.choices[0].finish_reason });
      }
      let grammar = '';
      for await (const { text } of model.generate('Answer:', {
        maxTokens: 10, temperature: 1, seed: 5,
        responseFormat: { type: 'grammar', grammar: { syntax: 'lark', definition: 'start: "yes" | "no"' } },
      })) grammar += text;
      const grammarStats = model.stats;
      // A conversation sent back turn by turn: its third turn reuses the second's cache.
      const messages = [{ role: 'user', content: 'Hello there.' }];
      const usage = [];
      for (const turn of [1, 2, 3]) {
        const reply = await create({ messages, max_tokens: 6 });
        usage.push(reply.usage);
        messages.push(reply.choices[0].message, { role: 'user', content: `Turn ${turn}.` });
      }
      let refused = null;
      try {
        await create({ ...request, tools: [] });
      } catch (e) {
        refused = { name: e.name, option: e.details?.option, message: e.message };
      }
      const controller = new AbortController();
      let aborted = null;
      try {
        for await (const chunk of await model.chat.completions.create({ ...request, stream: true, max_tokens: 40 }, { signal: controller.signal })) {
          if (chunk.choices[0]?.delta.content) controller.abort();
        }
      } catch (e) {
        aborted = e.name;
      }
      await model.unload();
      return { whole, chunks, constrained, grammar, grammarStats, usage, refused, aborted };
    }, { url: bundleUrl, request: CHAT_REQUEST });
  });
  process.stderr.write(`[browser test] chat (${engine}): ${JSON.stringify(outcome).slice(0, 1500)}\n`);
  const { whole, chunks, constrained, grammar, grammarStats, usage, refused, aborted } = outcome;
  // The same answer as `phi2 chat` natively.
  assert.equal(whole.object, 'chat.completion');
  assert.equal(whole.choices[0].message.content, native.chat.choices[0].message.content);
  assert.deepEqual(whole.usage, native.chat.usage);
  assert.equal(whole.choices[0].finish_reason, native.chat.choices[0].finish_reason);
  // Streamed: the same text in chunks, the finish reason, then the usage.
  assert.ok(chunks.every((c) => c.object === 'chat.completion.chunk' && c.id === chunks[0].id));
  assert.equal(chunks[0].choices[0].delta.role, 'assistant');
  assert.equal(chunks.map((c) => c.choices[0]?.delta.content ?? '').join(''), whole.choices[0].message.content);
  assert.equal(chunks.at(-2).choices[0].finish_reason, whole.choices[0].finish_reason);
  assert.deepEqual(chunks.at(-1).choices, []);
  // The same prompt again: all of it but its last token came from the cache.
  const { prompt_tokens_details: details, ...counts } = chunks.at(-1).usage;
  assert.deepEqual({ ...counts, prompt_tokens_details: { cached_tokens: 0 } }, whole.usage);
  assert.equal(details.cached_tokens, whole.usage.prompt_tokens - 1);
  for (const { content, finish } of constrained) {
    const value = JSON.parse(content);
    assert.deepEqual(Object.keys(value).sort(), ['n', 'name'], content);
    assert.ok(typeof value.name === 'string' && value.name.length <= 10 && Number.isInteger(value.n) && value.n >= 0 && value.n <= 99, content);
    assert.equal(finish, 'stop');
  }
  assert.ok(['yes', 'no'].includes(grammar), grammar);
  assert.equal(grammarStats.stopReason, 'stop');
  assert.ok(usage[2].prompt_tokens_details.cached_tokens >= usage[1].prompt_tokens, JSON.stringify(usage));
  assert.deepEqual(refused && [refused.name, refused.option], ['OptionError', 'tools'], JSON.stringify(refused));
  assert.equal(aborted, 'AbortError');
}));

// One engine is enough to check a bundler's output: the bundle is plain ESM either way.
test('an app bundled with esbuild imports the package and generates in the browser (Chromium)', TIMEOUT, async () => {
  const app = path.join(REPO, 'target', 'browser-app');
  rmSync(app, { recursive: true, force: true });
  mkdirSync(path.join(app, 'node_modules'), { recursive: true });
  symlinkSync(path.join(REPO, 'pkg'), path.join(app, 'node_modules', 'phi2-web'));
  writeFileSync(path.join(app, 'main.js'), `
    import { Phi2 } from 'phi2-web';
    const out = document.getElementById('result');
    try {
      const model = await Phi2.load('../../browser-bundles/phi-tok-q4/');
      const generatedIds = [];
      let text = '';
      for await (const t of model.generate(${JSON.stringify(PROMPT)}, { maxTokens: ${MAX_TOKENS} })) {
        generatedIds.push(t.tokenId);
        text += t.text;
      }
      out.textContent = JSON.stringify({ generatedIds, text, backend: model.backend });
    } catch (e) {
      out.textContent = JSON.stringify({ error: { name: e.name, message: e.message } });
      out.dataset.error = '1';
    }
    out.dataset.done = '1';
  `);
  execFileSync(path.join(TESTS, 'node_modules', '.bin', 'esbuild'),
    ['main.js', '--bundle', '--format=esm', '--outdir=dist'], { cwd: app, stdio: 'inherit' });
  // The package's worker and wasm are served next to the bundle, as its README says.
  cpSync(path.join(REPO, 'pkg', 'dist'), path.join(app, 'dist'), { recursive: true, force: false, errorOnExist: false });
  writeFileSync(path.join(app, 'dist', 'index.html'),
    '<!doctype html><meta charset="utf-8"><pre id="result"></pre><script type="module" src="main.js"></script>');
  const context = await browsers.chromium.newContext();
  try {
    const { result, isError } = await withPage(context, (page) => pageResult(page, `${server.url}target/browser-app/dist/index.html`));
    assert.equal(isError, false, JSON.stringify(result.error));
    assertSameAsNative(result, native.bundle, 'esbuild app');
  } finally {
    await context.close();
  }
});

test('the TypeScript typings compile for correct use and reject wrong use', { timeout: 3 * 60 * 1000 }, () => {
  const dir = path.join(REPO, 'target', 'typings-check');
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(path.join(dir, 'node_modules'), { recursive: true });
  symlinkSync(path.join(REPO, 'pkg'), path.join(dir, 'node_modules', 'phi2-web'));
  writeFileSync(path.join(dir, 'tsconfig.json'), JSON.stringify({
    compilerOptions: { strict: true, noEmit: true, target: 'es2022', module: 'nodenext', moduleResolution: 'nodenext', lib: ['es2022', 'dom'], skipLibCheck: false },
    files: ['app.ts'],
  }));
  writeFileSync(path.join(dir, 'package.json'), '{"type": "module"}');
  const good = `
    import { Phi2, Phi2Error, type LoadProgress, type GenerationStats } from 'phi2-web';
    const progress: LoadProgress[] = [];
    const model: Phi2 = await Phi2.load('models/phi-2/', { onProgress: (e) => progress.push(e), cache: true, worker: true, signal: new AbortController().signal, kernels: 'portable' });
    let text = '';
    for await (const { text: piece, tokenId } of model.generate('Instruct: hi\\nOutput:', { maxTokens: 8, temperature: 0.7, topK: 40, topP: 0.9, repetitionPenalty: 1.1, seed: 1, stop: ['\\n'] })) {
      text += piece + tokenId.toFixed(0);
    }
    const stats: GenerationStats | undefined = model.stats;
    const reason: 'eos' | 'stop' | 'length' | 'cancelled' | null | undefined = stats?.stopReason;
    try { await model.unload(); } catch (e) { if (e instanceof Phi2Error) console.log(e.name, e.details.tensor, reason, text); }
    const cached: boolean = await Phi2.isCached('models/phi-2/') && await Phi2.deleteCache('models/phi-2/') && await Phi2.hasWebGPU();
    console.log(cached, model.info?.backend === 'webgpu', model.info?.device.length);
    const completion = await model.chat.completions.create({ messages: [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'hi' }], max_tokens: 8, response_format: { type: 'json_object' } });
    const content: string = completion.choices[0].message.content;
    const cachedTokens: number = completion.usage.prompt_tokens_details.cached_tokens;
    const stream = await model.chat.completions.create({ messages: [{ role: 'user', content: [{ type: 'text', text: 'hi' }] }], stream: true }, { signal: new AbortController().signal });
    for await (const chunk of stream) console.log(chunk.choices[0]?.delta.content ?? '', chunk.usage?.total_tokens, content, cachedTokens);
    for await (const { text: json } of model.generate('x', { responseFormat: { type: 'grammar', grammar: { syntax: 'lark', definition: 'start: "a"' } }, frequencyPenalty: 0.5 })) console.log(json);
    const needs = await Phi2.requirements('models/phi-2/', { contextLength: 1024, backend: 'webgpu', f16: true });
    const free: number | undefined = needs.storage?.availableBytes;
    const why: string[] = needs.fits ? [] : needs.reasons.map((r) => r.name === 'QuotaError' ? \`\${r.details.bytes} > \${r.details.available}\` : r.message);
    const kv: 'f32' | 'f16' = needs.memory.kvCacheDtype;
    const tabs = await Phi2.load('models/phi-2/', { shared: true, whenBusy: 'cancel', persist: true, contextLength: 1024 });
    console.log(free, why, kv, tabs.info?.attached, tabs.info?.persisted, tabs.info?.requirements.memory.totalBytes, (await Phi2.cachedBundles()).map((b) => b.url + b.bytes + b.complete));
  `;
  const tsc = path.join(TESTS, 'node_modules', '.bin', 'tsc');
  writeFileSync(path.join(dir, 'app.ts'), good);
  execFileSync(tsc, ['-p', dir], { stdio: 'inherit' });
  // One mistake per line: a wrong option type, prompt type, generate option type, item field,
  // kernels value, chat role, response format, whenBusy value.
  writeFileSync(path.join(dir, 'app.ts'), [
    "import { Phi2 } from 'phi2-web';",
    "const model = await Phi2.load('x', { cache: 'yes' });",
    'model.generate(42);',
    "model.generate('x', { maxTokens: '8' });",
    "for await (const token of model.generate('x')) console.log(token.txt);",
    "await Phi2.load('x', { kernels: 'fast' });",
    "await model.chat.completions.create({ messages: [{ role: 'robot', content: 'x' }] });",
    "model.generate('x', { responseFormat: { type: 'xml' } });",
    "await Phi2.load('x', { whenBusy: 'later' });",
  ].join('\n'));
  let output = '';
  assert.throws(() => {
    try {
      execFileSync(tsc, ['-p', dir], { encoding: 'utf8' });
    } catch (e) {
      output = e.stdout;
      throw e;
    }
  }, 'wrong use must not compile');
  for (const line of [2, 3, 4, 5, 6, 7, 8, 9]) assert.match(output, new RegExp(`app\\.ts\\(${line},`), `no error on line ${line}:\n${output}`);
});

test('the package\'s own engines implement its Engine interface and speak the typed worker protocol', { timeout: 3 * 60 * 1000 }, () => {
  // The JS is checked where the package ships it (pkg/dist: next to the wasm bindings it imports).
  const dir = path.join(REPO, 'target', 'engine-typecheck');
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const tsc = path.join(TESTS, 'node_modules', '.bin', 'tsc');
  const dist = path.join(REPO, 'pkg', 'dist');
  const check = (name, files, lib) => {
    const config = path.join(dir, `${name}.json`);
    writeFileSync(config, JSON.stringify({
      compilerOptions: { strict: true, noEmit: true, allowJs: true, target: 'es2022', module: 'es2022', moduleResolution: 'bundler', lib: ['es2022', lib] },
      files,
    }));
    return execFileSync(tsc, ['-p', config], { encoding: 'utf8' });
  };
  // The page's side (the in-page engine and the worker's proxy), then the worker's.
  check('page', [path.join(dist, 'engine.js'), path.join(dist, 'worker-engine.js')], 'dom');
  check('worker', [path.join(dist, 'worker.js')], 'webworker');
  // A message the protocol does not have must not compile.
  const misuse = path.join(dir, 'misuse.ts');
  writeFileSync(misuse, [
    `import type { WorkerRequest, WorkerReply } from ${JSON.stringify(path.join(dist, 'protocol.js'))};`,
    "const pull: WorkerRequest = { type: 'pull', id: 1 };",
    "const token: WorkerReply = { type: 'item', id: 1, value: 'text' };",
    'console.log(pull, token);',
  ].join('\n'));
  let output = '';
  assert.throws(() => {
    try {
      check('misuse', [misuse], 'dom');
    } catch (e) {
      output = e.stdout;
      throw e;
    }
  }, 'a wrong message must not compile');
  for (const line of [2, 3]) assert.match(output, new RegExp(`misuse\\.ts\\(${line},`), `no error on line ${line}:\n${output}`);
});
