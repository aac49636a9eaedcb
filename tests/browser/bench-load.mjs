// Browser load benchmark (--tokens 0: load only): loads a bundle (default: the synthetic full-size Phi-2 from
// `phi2 synth --preset phi-2`) with the package in headless Chromium (or Firefox), from the
// network and then from the cache, and prints figures as JSON: load times, peak JS heap
// (sampled over CDP; Chromium only), wasm memory, the most chunk bytes the loader held at
// once, and the requirements checked before the download. Not a test: it asserts nothing.
//
//   node tests/browser/bench-load.mjs BUNDLE_DIR [--browser chromium|firefox]
//                                     [--backend webgpu|cpu] [--tokens N]
//                                     [--kernels auto|portable|subgroups] [--f16]
//                                     [--bench PROMPT_TOKENS,GEN_TOKENS,COPY_MB]
//                                     [--response-format JSON]   (decode under that constraint)
//                                     [--threads N]   (the CPU backend on N threads)
//
// --bench also runs `model.bench()` (what web/bench.html and `phi2 bench` run) after the cached
// load and prints its report.
//
// The engine runs on the page's thread (worker: false) so that CDP sees its heap; the worker
// runs the same code. With --threads it runs in its worker (the heap figure is then the page's). Both browsers get a persistent profile, as a user has: an incognito
// context's storage quota is too small to cache a 1.5 GB model.

import { existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer } from './server.mjs';
import { CHROMIUM_ARGS, chromiumPath, FIREFOX_PREFS, firefoxPath, forwardPageLogs, scriptArgs } from './browser.mjs';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const { option, flag, bundleDir } = scriptArgs();
const engine = option('--browser', 'chromium');
const backend = option('--backend', 'webgpu');
const f16 = flag('--f16');
const responseFormat = option('--response-format', null);
const kernels = option('--kernels', 'auto');
const tokens = Number(option('--tokens', '4'));
const bench = option('--bench', null)?.split(',').map(Number);
// The CPU backend on N threads: the engine then runs in its worker, on a cross-origin isolated
// page (the server sends COOP/COEP); without it, on the page's thread as before.
const threads = option('--threads', null) && Number(option('--threads', null));
if (!existsSync(path.join(bundleDir, 'manifest.json'))) {
  console.error(`no bundle at ${bundleDir} (make one: target/release/phi2 synth --preset phi-2 --out ${bundleDir})`);
  process.exit(2);
}
// Served under the repository root, next to the page.
const link = path.join(REPO, 'target', 'bench-bundle');
mkdirSync(path.dirname(link), { recursive: true });
rmSync(link, { force: true });
symlinkSync(bundleDir, link);

const isolation = { 'Cross-Origin-Opener-Policy': 'same-origin', 'Cross-Origin-Embedder-Policy': 'require-corp' };
const server = await startServer({ root: REPO, headers: threads ? isolation : {} });
const profile = mkdtempSync(path.join(os.tmpdir(), 'phi2-bench-profile-'));
const require = createRequire(import.meta.url);
let context;
let page;
let cdp = null;
if (engine === 'firefox') {
  context = await require('puppeteer-core').launch({
    browser: 'firefox', executablePath: firefoxPath(), headless: true, userDataDir: profile, extraPrefsFirefox: FIREFOX_PREFS,
  });
  page = await context.newPage();
} else {
  const { chromium } = require('playwright-core');
  context = await chromium.launchPersistentContext(profile, { executablePath: chromiumPath(), headless: true, args: CHROMIUM_ARGS });
  page = await context.newPage();
  cdp = await context.newCDPSession(page);
  await cdp.send('HeapProfiler.enable');
}
forwardPageLogs(page);

let peakHeap = cdp ? 0 : null;
let sampling = Boolean(cdp);
const sampler = (async () => {
  while (sampling) {
    try {
      const { usedSize } = await cdp.send('Runtime.getHeapUsage');
      peakHeap = Math.max(peakHeap, usedSize);
    } catch {
      // the page is between states
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
})();

async function load(label) {
  if (cdp) peakHeap = 0;
  const figures = await page.evaluate(async ({ backend, kernels, f16, tokens, bench, responseFormat, threads }) => {
    const { Phi2 } = await import(new URL('pkg/index.js', location.href).href);
    const started = performance.now();
    const model = await Phi2.load('../target/bench-bundle/', { worker: Boolean(threads), backend, kernels, f16, threads: threads ?? undefined });
    const loadMs = performance.now() - started;
    let generated = 0;
    if (tokens > 0) {
      for await (const token of model.generate('Instruct: Say hello.\nOutput:', { maxTokens: tokens })) generated += token ? 1 : 0;
    }
    const report = bench
      ? await model.bench({ promptTokens: bench[0], genTokens: bench[1], copyMb: bench[2], responseFormat })
      : null;
    const result = { loadMs, info: model.info, stats: model.stats, generated, report };
    await model.unload();
    return result;
  }, { backend, kernels, f16, tokens, bench: label === 'cache' ? bench : null, responseFormat: responseFormat && JSON.parse(responseFormat), threads });
  await new Promise((resolve) => setTimeout(resolve, 300));
  return { label, ...figures, peakJsHeapBytes: peakHeap };
}

await page.goto(`${server.url}web/index.html`);
await page.evaluate(async () => {
  const { Phi2 } = await import(new URL('pkg/index.js', location.href).href);
  await Phi2.deleteCache('../target/bench-bundle/');
});
const chunkRequestsSince = (mark) => server.requests.slice(mark).filter((r) => /chunk-/.test(r.path)).length;
const network = await load('network');
const mark = server.requests.length;
const chunkRequestsFromNetwork = chunkRequestsSince(0);
const cached = await load('cache');
const chunkRequestsFromCache = chunkRequestsSince(mark);
sampling = false;
await sampler;
const mb = (bytes) => Math.round(bytes / 1e5) / 10;
const summary = (run) => ({
  load_s: Math.round(run.loadMs) / 1000,
  peak_js_heap_mb: run.peakJsHeapBytes === null ? null : mb(run.peakJsHeapBytes),
  wasm_memory_mb: mb(run.info.wasmMemoryBytes),
  peak_buffered_chunks_mb: mb(run.info.peakBufferedBytes),
  peak_js_plus_wasm_mb: run.peakJsHeapBytes === null ? null
    : mb(run.peakJsHeapBytes + run.info.wasmMemoryBytes + run.info.peakBufferedBytes),
  time_to_first_token_s: run.stats ? run.stats.timeToFirstTokenMs / 1000 : null,
  decode_tokens_per_s: run.stats ? run.stats.decodeTokensPerS : null,
});
console.log(JSON.stringify({
  bundle: bundleDir,
  browser: engine,
  backend: network.info.backend,
  threads: network.info.threads,
  bundle_mb: mb(network.info.totalBytes),
  network: { ...summary(network), chunk_requests: chunkRequestsFromNetwork },
  cache: { ...summary(cached), chunk_requests: chunkRequestsFromCache },
  warnings: [...network.info.warnings, ...cached.info.warnings],
  // What the first load checked before its download (Phi2.requirements' figures).
  requirements: network.info.requirements,
  bench: cached.report,
}, null, 2));
await context.close();
await server.close();
rmSync(link, { force: true });
rmSync(profile, { recursive: true, force: true });
