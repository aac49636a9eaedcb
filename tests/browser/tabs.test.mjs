// Storage and tabs, in Chromium: a load that cannot be stored is refused before any chunk is
// fetched (`Phi2.requirements`, QuotaError), storage filled during a load costs only the cache,
// and two tabs of one origin share a download: one engine in a SharedWorker (`shared: true`),
// or, without it, the second tab waits for the first (Web Locks) and loads from the cache.
// The server's request log says what was downloaded; greedy tokens must equal the CLI's.
//
// Chromium runs without its static reported quota (StaticStorageQuota, on by default):
// with it, navigator.storage.estimate() reports usage + 10 GiB whatever the real limit, and a
// CDP quota override shows only when a write fails. Without it, estimate() reports the
// override, as Firefox and Safari report their real limits.
//
//   node --test tests/browser/          (needs what product.test.mjs needs)

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer } from './server.mjs';
import { launchChromium, forwardPageLogs } from './browser.mjs';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BUNDLE = 'target/browser-bundles/phi-tok-q4-tabs';
const PHI2_BIN = process.env.PHI2_BIN || path.join(REPO, 'target', 'debug', 'phi2');
const PROMPT = 'Hello World';
const TOKENS = 6;
const TIMEOUT = { timeout: 8 * 60 * 1000 };

let server;
let browser;
let expectedIds;
let manifest;
/** path → faults still to inject, one per request, in order (server.mjs). */
let planned = new Map();

before(async () => {
  assert.ok(existsSync(path.join(REPO, 'pkg/dist/index.js')), 'the package build is missing (scripts/build-pkg.sh)');
  assert.ok(existsSync(PHI2_BIN), `the phi2 CLI is missing: ${PHI2_BIN}`);
  rmSync(path.join(REPO, BUNDLE), { recursive: true, force: true });
  execFileSync(PHI2_BIN, ['convert', '--from', 'tests/fixtures/phi-tok', '--out', BUNDLE, '--chunk-mb', '1'], { cwd: REPO });
  manifest = JSON.parse(readFileSync(path.join(REPO, BUNDLE, 'manifest.json'), 'utf8'));
  const native = JSON.parse(execFileSync(PHI2_BIN, ['generate', '--model', BUNDLE, '--prompt', PROMPT,
    '--max-tokens', String(TOKENS), '--json', '--backend', 'cpu'], { cwd: REPO, encoding: 'utf8' }).trim().split('\n').pop());
  expectedIds = native.generated_ids;
  server = await startServer({ root: REPO, fault: (file) => planned.get(file)?.shift() });
  browser = await launchChromium({ extraArgs: ['--disable-features=StaticStorageQuota'] });
});

after(async () => {
  await browser?.close();
  await server?.close();
});

const chunkPaths = () => manifest.chunks.map((_, i) => `/${BUNDLE}/chunk-${String(i).padStart(5, '0')}.bin`);
const chunkRequests = (from) => server.requests.slice(from).filter((r) => /chunk-\d+\.bin$/.test(r.path)).map((r) => r.path);
/** Every chunk answered `ms` late, so that a second tab starts while the first downloads. */
const delayChunks = (ms) => (planned = new Map(chunkPaths().map((p) => [p, [{ delayMs: ms }]])));

async function openPages(context, count) {
  const pages = [];
  for (let i = 0; i < count; i++) {
    const page = await context.newPage();
    forwardPageLogs(page, `tab ${i + 1}`);
    await page.goto(`${server.url}tests/browser/pages/blank.html`);
    pages.push(page);
  }
  return pages;
}

/**
 * Starts `Phi2.load(bundle, options)` in `page` (kept as `window.loaded`), recording its
 * progress phases.
 */
function startLoad(page, options) {
  return page.evaluate(({ url, options }) => {
    window.phases = [];
    window.loaded = import(new URL('/pkg/dist/index.js', location.href).href)
      .then(({ Phi2 }) => Phi2.load(url, { ...options, onProgress: (e) => window.phases.push(e.phase) }));
    window.loaded.catch(() => {});
  }, { url: `/${BUNDLE}/`, options });
}

/** Awaits the load started by `startLoad`, then generates: {ids, info, phases} or {error}. */
function finishAndGenerate(page, { unload = true, whenBusyTokens } = {}) {
  return page.evaluate(async ({ prompt, tokens, unload }) => {
    try {
      const model = await window.loaded;
      window.model = model;
      const ids = [];
      for await (const token of model.generate(prompt, { maxTokens: tokens })) ids.push(token.tokenId);
      const { info, stats } = model;
      if (unload) await model.unload();
      return { ids, info, stopReason: stats.stopReason, phases: [...new Set(window.phases)] };
    } catch (e) {
      return { error: { name: e.name, message: e.message, details: e.details } };
    }
  }, { prompt: PROMPT, tokens: whenBusyTokens ?? TOKENS, unload });
}

async function until(condition, what, timeoutMs = 60_000) {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

test('a quota too small for the bundle: requirements says so, load fails before any chunk request, cache: false loads', TIMEOUT, async () => {
  planned = new Map();
  const context = await browser.newContext();
  try {
    const [page] = await openPages(context, 1);
    const cdp = await context.newCDPSession(page);
    const total = manifest.chunks.reduce((sum, c) => sum + c.size, 0);
    await cdp.send('Storage.overrideQuotaForOrigin', { origin: new URL(server.url).origin, quotaSize: Math.floor(total / 2) });
    const mark = server.requests.length;
    const checked = await page.evaluate(async (url) => {
      const { Phi2 } = await import(new URL('/pkg/dist/index.js', location.href).href);
      const needs = await Phi2.requirements(url, { backend: 'cpu' });
      const shorter = await Phi2.requirements(url, { backend: 'cpu', contextLength: 512 });
      const describe = (e) => ({ name: e.name, message: e.message, details: e.details });
      let refused = null;
      try {
        await Phi2.load(url, { backend: 'cpu' });
      } catch (e) {
        refused = describe(e);
      }
      const badContext = await Phi2.requirements(url, { contextLength: 0 }).catch(describe);
      return { needs, shorter: shorter.memory, refused, badContext };
    }, `/${BUNDLE}/`);
    process.stderr.write(`[tabs] small quota: ${JSON.stringify(checked).slice(0, 1500)}\n`);
    const { needs, shorter, refused, badContext } = checked;
    assert.equal(needs.fits, false);
    assert.deepEqual(needs.reasons.map((r) => r.name), ['QuotaError']);
    assert.equal(needs.download.bytesToDownload, needs.download.totalBytes);
    assert.ok(needs.download.totalBytes > total, 'the manifest and chunks are counted');
    assert.ok(needs.storage.availableBytes < needs.download.bytesToDownload, JSON.stringify(needs.storage));
    assert.ok(needs.memory.weightsBytes > 0 && needs.memory.kvCacheBytes > 0, JSON.stringify(needs.memory));
    assert.equal(refused?.name, 'QuotaError', JSON.stringify(refused));
    assert.equal(refused.details.bytes, needs.download.bytesToDownload);
    assert.equal(refused.details.available, needs.storage.availableBytes);
    assert.deepEqual(chunkRequests(mark), [], 'a refused load fetched chunks');
    // A quarter of the context, a quarter of the KV cache; a context of 0 is refused by name.
    assert.equal(shorter.contextLength, 512);
    assert.equal(shorter.kvCacheBytes * 4, needs.memory.kvCacheBytes);
    assert.equal(shorter.weightsBytes, needs.memory.weightsBytes);
    assert.deepEqual([badContext.name, badContext.details?.option], ['OptionError', 'contextLength'], JSON.stringify(badContext));
    // Without the cache it needs no storage, and loads (here with the shorter context).
    await startLoad(page, { backend: 'cpu', cache: false, worker: false, contextLength: 512 });
    const uncached = await finishAndGenerate(page);
    assert.deepEqual(uncached.ids, expectedIds, JSON.stringify(uncached));
    assert.equal(uncached.info.contextLength, 512);
    assert.equal(uncached.info.requirements.storage, null);
  } finally {
    await context.close();
  }
});

test('storage filled during a load: the load succeeds, warns, keeps what fit, and the next one fetches the rest', TIMEOUT, async () => {
  const context = await browser.newContext();
  try {
    const [page] = await openPages(context, 1);
    const cdp = await context.newCDPSession(page);
    const total = manifest.chunks.reduce((sum, c) => sum + c.size, 0);
    await cdp.send('Storage.overrideQuotaForOrigin', { origin: new URL(server.url).origin, quotaSize: 2 * total });
    delayChunks(1000);
    const mark = server.requests.length;
    await startLoad(page, { backend: 'cpu', worker: false, concurrency: 1 });
    // The requirements passed once a chunk is asked for; then another writer takes the room
    // of all but about half the bundle.
    await until(() => chunkRequests(mark).length > 0, 'the first chunk request');
    await page.evaluate(async (keep) => {
      const { quota, usage } = await navigator.storage.estimate();
      const filler = await caches.open('filler');
      await filler.put('/filler', new Response(new Uint8Array(quota - usage - keep)));
    }, Math.floor(total / 2));
    const first = await finishAndGenerate(page);
    const cached = await page.evaluate(async () => (await (await caches.open('phi2-web-bundles-v1')).keys())
      .filter((r) => /chunk-/.test(r.url)).length);
    process.stderr.write(`[tabs] storage filled mid-load: ${JSON.stringify({ ...first, cached })}\n`);
    assert.deepEqual(first.ids, expectedIds, JSON.stringify(first));
    assert.ok(first.info.warnings.some((w) => /QuotaExceeded|not cached/.test(w)), `no storage warning: ${JSON.stringify(first.info.warnings)}`);
    assert.ok(cached > 0 && cached < manifest.chunks.length, `cached ${cached} of ${manifest.chunks.length} chunks`);
    // With the room back, the next load takes what was cached and downloads only the rest.
    planned = new Map();
    await cdp.send('Storage.overrideQuotaForOrigin', { origin: new URL(server.url).origin, quotaSize: 4 * total });
    const again = server.requests.length;
    await startLoad(page, { backend: 'cpu', worker: false });
    const second = await finishAndGenerate(page);
    assert.deepEqual(second.ids, expectedIds, JSON.stringify(second));
    assert.equal(chunkRequests(again).length, manifest.chunks.length - cached, 'only the chunks that did not fit are downloaded again');
  } finally {
    await context.close();
  }
});

test('tabs with the shared engine: one download, one model, the same tokens; queued or cancelled generations', TIMEOUT, async () => {
  const context = await browser.newContext();
  try {
    const [first, second, third] = await openPages(context, 3);
    delayChunks(300);
    const mark = server.requests.length;
    await startLoad(first, { shared: true });
    await until(() => chunkRequests(mark).length > 0, 'the first tab\'s download');
    // The second tab joins the load under way; their generations queue.
    await startLoad(second, { shared: true });
    const [a, b] = await Promise.all([finishAndGenerate(first, { unload: false }), finishAndGenerate(second, { unload: false })]);
    // The third attaches to the loaded model; its generations cancel the others'.
    await startLoad(third, { shared: true, whenBusy: 'cancel' });
    const c = await finishAndGenerate(third, { unload: false });
    process.stderr.write(`[tabs] shared: ${JSON.stringify({ a, b, c }).slice(0, 1500)}\n`);
    for (const result of [a, b, c]) {
      assert.deepEqual(result.ids, expectedIds, JSON.stringify(result));
      assert.equal(result.info.shared, true, JSON.stringify(result.info));
      assert.equal(result.info.backend, 'webgpu');
    }
    assert.deepEqual([a.info.attached, b.info.attached, c.info.attached], [false, true, true]);
    assert.deepEqual(c.phases, [], 'an attached tab loads nothing');
    assert.deepEqual(chunkRequests(mark).sort(), chunkPaths(), 'each chunk is downloaded once');
    // A long generation in the first tab ends when the third tab's starts.
    const long = first.evaluate(async (prompt) => {
      let count = 0;
      try {
        for await (const token of window.model.generate(prompt, { maxTokens: 2000 })) {
          if (++count === 1) window.firstToken = true;
        }
        return { count, stopReason: window.model.stats.stopReason };
      } catch (e) {
        return { count, error: e.name };
      }
    }, PROMPT);
    await first.waitForFunction(() => window.firstToken === true);
    const cancelling = await third.evaluate(async (prompt) => {
      const ids = [];
      for await (const token of window.model.generate(prompt, { maxTokens: 4 })) ids.push(token.tokenId);
      return ids;
    }, PROMPT);
    const ended = await long;
    assert.deepEqual(cancelling, expectedIds.slice(0, 4));
    assert.ok(ended.count < 2000, `the first tab's generation was not cancelled: ${JSON.stringify(ended)}`);
    // The model outlives the tabs that leave; the last one frees it.
    await second.evaluate(() => window.model.unload());
    await third.close();
    const after = await first.evaluate(async (prompt) => {
      const ids = [];
      for await (const token of window.model.generate(prompt, { maxTokens: 2 })) ids.push(token.tokenId);
      await window.model.unload();
      return ids;
    }, PROMPT);
    assert.deepEqual(after, expectedIds.slice(0, 2));
  } finally {
    await context.close();
  }
});

test('two tabs without the shared engine: the second waits for the first\'s download, then loads from the cache', TIMEOUT, async () => {
  const context = await browser.newContext();
  try {
    const [first, second] = await openPages(context, 2);
    delayChunks(1500);
    const mark = server.requests.length;
    await startLoad(first, {});
    await until(() => chunkRequests(mark).length > 0, 'the first tab\'s download');
    await startLoad(second, {});
    const [a, b] = await Promise.all([finishAndGenerate(first), finishAndGenerate(second)]);
    process.stderr.write(`[tabs] locked: ${JSON.stringify({ a, b }).slice(0, 1500)}\n`);
    assert.deepEqual(a.ids, expectedIds, JSON.stringify(a));
    assert.deepEqual(b.ids, expectedIds, JSON.stringify(b));
    assert.deepEqual(a.phases, ['download', 'upload', 'compile'], JSON.stringify(a.phases));
    assert.deepEqual(b.phases, ['wait', 'cache', 'upload', 'compile'], JSON.stringify(b.phases));
    assert.deepEqual(chunkRequests(mark).sort(), chunkPaths(), 'each chunk is downloaded once');
  } finally {
    await context.close();
  }
});

test('the demo page shows what the model needs before Load, and deletes other cached models to free space', TIMEOUT, async () => {
  planned = new Map();
  const context = await browser.newContext();
  try {
    const [page] = await openPages(context, 1);
    await page.goto(`${server.url}web/index.html?model=${encodeURIComponent(`../${BUNDLE}/`)}&backend=webgpu`);
    await page.waitForFunction(() => /tokens/.test(document.querySelector('#cached').textContent));
    const before = await page.evaluate(() => document.querySelector('#cached').textContent);
    const { needs, cached, persisted, granted } = await page.evaluate(async (url) => {
      const { Phi2 } = await import(new URL('pkg/index.js', location.href).href);
      const needs = await Phi2.requirements(url, { backend: 'webgpu' });
      const model = await Phi2.load(url, { backend: 'cpu', worker: false, persist: true });
      const { persisted } = model.info;
      await model.unload();
      return { needs, cached: await Phi2.cachedBundles(), persisted, granted: await navigator.storage.persisted() };
    }, `../${BUNDLE}/`);
    // The page's sizes: GB with 2 decimals from 1 GB, else MB (2 decimals below 10 MB, else 1).
    const size = (bytes) => (bytes >= 1e9 ? `${(bytes / 1e9).toFixed(2)} GB` : `${(bytes / 1e6).toFixed(bytes < 1e7 ? 2 : 1)} MB`);
    const mb = (bytes) => size(bytes).replace(' MB', '');
    assert.equal(before, `${size(needs.download.bytesToDownload)} to download, ${size(needs.storage.availableBytes)} free; needs ~${size(needs.memory.totalBytes)} of GPU memory at 2048 tokens`);
    assert.deepEqual(cached.map((b) => [b.url, b.complete]), [[needs.url, true]]);
    assert.equal(persisted, granted, 'info.persisted is the browser\'s answer to persist: true');
    // Another model in the field: the cached one is offered for deletion, and the button frees it.
    await page.fill('#model-url', '../tests/fixtures/does-not-exist/');
    await page.waitForSelector('#cached-bundles:not([hidden]) button');
    const offered = await page.evaluate(() => document.querySelector('#cached-bundles').textContent);
    assert.match(offered, new RegExp(`Also cached: ${needs.url.replace(/[.?]/g, '\\$&')} \\(${mb(cached[0].bytes)} MB\\)Delete to free space`));
    await page.click('#cached-bundles button');
    await page.waitForSelector('#cached-bundles[hidden]', { state: 'attached' });
    assert.deepEqual(await page.evaluate(async () => (await import(new URL('pkg/index.js', location.href).href)).Phi2.cachedBundles()), []);
  } finally {
    await context.close();
  }
});
