// Downloads that recover: the package loads a bundle from a server that fails on purpose
// (HTTP 503, connections cut or stalled mid-body, corrupted bytes, missing files), in 50 seeded
// scenarios.
// For each, a model of the documented policy (4 attempts per download with backoff; a chunk
// that fails its sha256 is fetched once more) says whether the load must succeed; then it must
// generate the CLI's tokens, or fail with a typed error naming the file — never hang, never
// keep a corrupt chunk. The cache carries over between scenarios (resumed loads), and a chunk
// verified by an earlier load is never downloaded again.
//
//   node --test tests/browser/          (needs what product.test.mjs needs)

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, rmSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer } from './server.mjs';
import { launchChromium, forwardPageLogs } from './browser.mjs';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BUNDLE = 'target/browser-bundles/phi-tok-q4-faults';
const PHI2_BIN = process.env.PHI2_BIN || path.join(REPO, 'target', 'debug', 'phi2');
const PROMPT = 'Hello World';
const TOKENS = 4;
const ATTEMPTS = 4; // pkg/src/engine.js
/** The loads' `stallTimeoutMs`: a stalled download is retried after this long. */
const STALL_MS = 2000;
const SCENARIOS = 50;

let server;
let browser;
let page;
let expectedIds;
/** path → faults still to inject, one per request, in order. */
let planned = new Map();

/** mulberry32: a small seeded PRNG, so every scenario can be replayed from its seed. */
function prng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function scenario(seed, files) {
  const random = prng(seed);
  const pick = (items) => items[Math.floor(random() * items.length)];
  const faults = new Map();
  for (const file of files) {
    const isChunk = /chunk-\d+\.bin$/.test(file.path);
    const count = pick([0, 0, 0, 1, 1, 2, 3, 4, 5]);
    const list = [];
    for (let i = 0; i < count; i++) {
      const kinds = ['503', 'drop', 'drop', 'stall', ...(isChunk ? ['corrupt', 'corrupt'] : []), ...(random() < 0.1 ? ['404'] : [])];
      const kind = pick(kinds);
      if (kind === '503') list.push({ status: 503 });
      else if (kind === '404') list.push({ status: 404 });
      else if (kind === 'drop') list.push({ dropAfter: Math.floor(random() * file.size) });
      else if (kind === 'stall') list.push({ stallAfter: Math.floor(random() * file.size) });
      else list.push({ corruptAt: Math.floor(random() * file.size) });
    }
    faults.set(file.path, list);
  }
  return faults;
}

/**
 * What the package must do with these faults, for a file it has to download: 'ok' or the error
 * name. `download` takes up to ATTEMPTS tries, stopping at a 404; a chunk whose bytes are corrupt
 * is downloaded once more.
 */
function expectedOutcome(faults, isChunk) {
  const queue = [...faults];
  const download = () => {
    for (let attempt = 0; attempt < ATTEMPTS; attempt++) {
      const fault = queue.shift();
      if (!fault) return 'ok';
      if (fault.status === 404) return 'LoadError';
      if (fault.corruptAt !== undefined) return 'corrupt';
    }
    return 'LoadError';
  };
  const first = download();
  if (first !== 'corrupt') return first;
  if (!isChunk) return 'FormatError';
  const second = download();
  return second === 'corrupt' ? 'IntegrityError' : second;
}

before(async () => {
  assert.ok(existsSync(path.join(REPO, 'pkg/dist/index.js')), 'the package build is missing (scripts/build-pkg.sh)');
  assert.ok(existsSync(PHI2_BIN), `the phi2 CLI is missing: ${PHI2_BIN}`);
  rmSync(path.join(REPO, BUNDLE), { recursive: true, force: true });
  execFileSync(PHI2_BIN, ['convert', '--from', 'tests/fixtures/phi-tok', '--out', BUNDLE, '--chunk-mb', '1'], { cwd: REPO });
  const native = JSON.parse(execFileSync(PHI2_BIN, ['generate', '--model', BUNDLE, '--prompt', PROMPT,
    '--max-tokens', String(TOKENS), '--json', '--backend', 'cpu'], { cwd: REPO, encoding: 'utf8' }).trim().split('\n').pop());
  expectedIds = native.generated_ids;
  server = await startServer({
    root: REPO,
    fault: (file) => planned.get(file)?.shift(),
  });
  browser = await launchChromium();
  page = await browser.newPage();
  forwardPageLogs(page);
  await page.goto(`${server.url}web/index.html`);
});

after(async () => {
  await browser?.close();
  await server?.close();
});

async function loadAndGenerate() {
  return page.evaluate(async ({ url, prompt, tokens, stallTimeoutMs }) => {
    const { Phi2 } = await import(new URL('pkg/index.js', location.href).href);
    try {
      const model = await Phi2.load(url, { worker: false, backend: 'cpu', concurrency: 2, stallTimeoutMs });
      const ids = [];
      for await (const token of model.generate(prompt, { maxTokens: tokens })) ids.push(token.tokenId);
      await model.unload();
      return { ok: true, ids };
    } catch (e) {
      return { ok: false, name: e.name, message: e.message, details: e.details };
    }
  }, { url: `../${BUNDLE}/`, prompt: PROMPT, tokens: TOKENS, stallTimeoutMs: STALL_MS });
}

test(`the loader recovers from transient faults and names the file otherwise (${SCENARIOS} seeded scenarios)`, { timeout: 40 * 60 * 1000 }, async () => {
  const manifest = JSON.parse(execFileSync('cat', [path.join(REPO, BUNDLE, 'manifest.json')], { encoding: 'utf8' }));
  const base = `/${BUNDLE}/`;
  const files = [
    { path: `${base}manifest.json`, size: Buffer.byteLength(JSON.stringify(manifest)) },
    { path: `${base}${manifest.tokenizer}`, size: 1000 },
    ...manifest.chunks.map((c) => ({ path: `${base}${c.file}`, size: c.size })),
  ];
  const manifestCached = async () => page.evaluate(async (url) => {
    const cache = await caches.open('phi2-web-bundles-v1');
    return Boolean(await cache.match(new URL('manifest.json', new URL(url, location.href)).href));
  }, `../${BUNDLE}/`);
  const cachedChunks = async () => page.evaluate(async () => {
    const cache = await caches.open('phi2-web-bundles-v1');
    return (await cache.keys()).map((r) => new URL(r.url).pathname).filter((p) => /chunk-/.test(p));
  });
  const outcomes = { ok: 0 };
  let verified = [];
  for (let seed = 1; seed <= SCENARIOS; seed++) {
    // Every third scenario starts from an empty cache; the others resume what is cached.
    if (seed % 3 === 1) {
      await page.evaluate(async (url) => {
        const { Phi2 } = await import(new URL('pkg/index.js', location.href).href);
        await Phi2.deleteCache(url);
      }, `../${BUNDLE}/`);
      verified = [];
    }
    const faults = scenario(seed, files);
    planned = new Map([...faults].map(([file, list]) => [file, [...list]]));
    const requestsBefore = server.requests.length;
    const wasCached = await manifestCached();
    const started = Date.now();
    const result = await loadAndGenerate();
    const requests = server.requests.slice(requestsBefore);
    const requested = new Set(requests.map((r) => r.path));
    const label = `seed ${seed}: ${JSON.stringify([...faults].filter(([, l]) => l.length))} → ${JSON.stringify(result).slice(0, 300)} (${Date.now() - started} ms; requests: ${requests.map((r) => `${r.path.split('/').pop()} ${r.status}${r.fault ? ' ' + JSON.stringify(r.fault) : ''}`).join(', ')})`;
    process.stderr.write(`[faults] ${label}\n`);

    // A chunk verified (and so cached) by an earlier load is never downloaded again.
    const again = verified.filter((chunk) => requested.has(chunk));
    assert.deepEqual(again, [], `verified chunks downloaded twice: ${label}`);
    verified = await cachedChunks();

    // The manifest is always asked for (it may have changed); other files only when not cached.
    let expected = 'ok';
    let failingFile;
    for (const file of files) {
      if (!requested.has(file.path)) continue;
      const outcome = expectedOutcome(faults.get(file.path), /chunk-/.test(file.path));
      // A manifest that cannot be fetched is taken from the cache when it is there.
      if (outcome !== 'ok' && !(file.path.endsWith('manifest.json') && wasCached && outcome === 'LoadError')) {
        expected = outcome;
        failingFile = file.path;
        break;
      }
    }
    if (expected === 'ok') {
      assert.ok(result.ok, `expected success: ${label}`);
      assert.deepEqual(result.ids, expectedIds, label);
    } else {
      assert.equal(result.ok, false, `expected ${expected}: ${label}`);
      assert.equal(result.name, expected, label);
      assert.ok(String(result.details?.file ?? '').endsWith(failingFile) || result.message.includes(failingFile), `the error must name ${failingFile}: ${label}`);
    }
    outcomes[result.ok ? 'ok' : result.name] = (outcomes[result.ok ? 'ok' : result.name] ?? 0) + 1;
  }
  process.stderr.write(`[faults] outcomes: ${JSON.stringify(outcomes)}\n`);
  const served = { 503: 0, 404: 0, drop: 0, stall: 0, corrupt: 0 };
  for (const request of server.requests) {
    const fault = request.fault ?? {};
    if (fault.status) served[fault.status] += 1;
    if (fault.dropAfter !== undefined) served.drop += 1;
    if (fault.stallAfter !== undefined) served.stall += 1;
    if (fault.corruptAt !== undefined) served.corrupt += 1;
  }
  console.log([
    '| scenarios | loads that succeeded (CLI tokens) | LoadError | IntegrityError | faults served: 503 / 404 / cut / stalled / corrupt |',
    '| --- | --- | --- | --- | --- |',
    `| ${SCENARIOS} | ${outcomes.ok} | ${outcomes.LoadError ?? 0} | ${outcomes.IntegrityError ?? 0} | ${served[503]} / ${served[404]} / ${served.drop} / ${served.stall} / ${served.corrupt} |`,
  ].join('\n'));
  assert.ok(outcomes.ok >= 10 && Object.keys(outcomes).length >= 3, `the scenarios should mix outcomes: ${JSON.stringify(outcomes)}`);
  assert.ok(served.stall > 0 && served.drop > 0 && served.corrupt > 0 && served[503] > 0, `every kind of fault must be served: ${JSON.stringify(served)}`);

  // Nothing corrupt was kept: with the faults gone, the load succeeds, and a second load makes
  // no chunk request.
  planned = new Map();
  const clean = await loadAndGenerate();
  assert.ok(clean.ok, JSON.stringify(clean));
  assert.deepEqual(clean.ids, expectedIds);
  const mark = server.requests.length;
  const again = await loadAndGenerate();
  assert.ok(again.ok && server.requests.slice(mark).every((r) => !/chunk-/.test(r.path)), 'the second clean load must come from the cache');
});

test('a corrupt chunk in the cache is fetched again, not used', { timeout: 5 * 60 * 1000 }, async () => {
  planned = new Map();
  const first = await loadAndGenerate();
  assert.ok(first.ok, JSON.stringify(first));
  await page.evaluate(async (url) => {
    const cache = await caches.open('phi2-web-bundles-v1');
    const key = new URL('chunk-00000.bin', new URL(url, location.href)).href;
    const bytes = new Uint8Array(await (await cache.match(key)).arrayBuffer());
    bytes[100] ^= 0xff;
    await cache.put(key, new Response(bytes));
  }, `../${BUNDLE}/`);
  const mark = server.requests.length;
  const result = await loadAndGenerate();
  assert.ok(result.ok, JSON.stringify(result));
  assert.deepEqual(result.ids, expectedIds);
  const chunkRequests = server.requests.slice(mark).filter((r) => /chunk-/.test(r.path)).map((r) => r.path);
  assert.deepEqual(chunkRequests, [`/${BUNDLE}/chunk-00000.bin`], 'only the corrupt chunk is fetched again');
});
