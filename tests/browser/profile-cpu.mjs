// Where a decoded token's time goes on the package's CPU backend, in headless Chromium: loads a
// bundle (default: the synthetic full-size Phi-2) with `backend: 'cpu'` on the page's thread,
// decodes a few tokens to warm up, then records V8's CPU profile over `--tokens` more and
// prints the functions with the most self time (wasm functions by name: point `--pkg` at a
// build whose wasm keeps its name section, i.e. not stripped). Not a test: it asserts nothing.
//
//   node tests/browser/profile-cpu.mjs [BUNDLE_DIR] [--pkg DIR] [--tokens N] [--top N]
//
// A package with names, after scripts/build-pkg.sh (which strips them):
//   wasm-bindgen --target web --no-typescript --out-dir DIR/wasm \
//       target/wasm32-unknown-unknown/wasm-size/phi2_web.wasm && cp pkg/src/*.js DIR/

import { mkdirSync, rmSync, symlinkSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer } from './server.mjs';
import { launchChromium, forwardPageLogs, scriptArgs } from './browser.mjs';

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const { option, bundleDir } = scriptArgs();
const pkgDir = path.resolve(option('--pkg', path.join(REPO, 'pkg', 'dist')));
const tokens = Number(option('--tokens', '4'));
const top = Number(option('--top', '25'));

// Both are served under the repository root.
const links = { bundle: path.join(REPO, 'target', 'profile-bundle'), pkg: path.join(REPO, 'target', 'profile-pkg') };
mkdirSync(path.join(REPO, 'target'), { recursive: true });
rmSync(links.bundle, { force: true });
rmSync(links.pkg, { force: true });
symlinkSync(bundleDir, links.bundle);
symlinkSync(pkgDir, links.pkg);

const server = await startServer({ root: REPO });
const browser = await launchChromium();
try {
  const page = await browser.newPage();
  forwardPageLogs(page);
  await page.goto(`${server.url}tests/browser/pages/blank.html`);
  const cdp = await page.context().newCDPSession(page);
  const prompt = 'Instruct: Say hello.\nOutput:';
  await page.evaluate(async (prompt) => {
    const { Phi2 } = await import('/target/profile-pkg/index.js');
    window.model = await Phi2.load('/target/profile-bundle/', { backend: 'cpu', worker: false, cache: false });
    for await (const token of window.model.generate(prompt, { maxTokens: 2 })) void token;
  }, prompt);
  await cdp.send('Profiler.enable');
  await cdp.send('Profiler.setSamplingInterval', { interval: 1000 });
  await cdp.send('Profiler.start');
  const stats = await page.evaluate(async ({ prompt, tokens }) => {
    // The same prompt again: the cache serves it, so what runs is the decoding.
    for await (const token of window.model.generate(prompt, { maxTokens: 2 + tokens })) void token;
    return window.model.stats;
  }, { prompt, tokens });
  const { profile } = await cdp.send('Profiler.stop');
  // Self time per function: samples whose leaf is that function.
  const byId = new Map(profile.nodes.map((node) => [node.id, node]));
  const counts = new Map();
  for (const id of profile.samples) {
    const { functionName, url } = byId.get(id).callFrame;
    const name = functionName || `(anonymous ${url.split('/').pop()})`;
    counts.set(name, (counts.get(name) ?? 0) + 1);
  }
  const total = profile.samples.length;
  const rows = [...counts].sort((a, b) => b[1] - a[1]).slice(0, top)
    .map(([name, count]) => ({ share: `${((100 * count) / total).toFixed(1)} %`, function: name }));
  console.log(JSON.stringify({ bundle: bundleDir, decodeTokensPerS: stats.decodeTokensPerS, samples: total, top: rows }, null, 2));
} finally {
  await browser.close();
  await server.close();
  rmSync(links.bundle, { force: true });
  rmSync(links.pkg, { force: true });
}
