// Shared helpers for the browser tests: launching either engine, headless, with one small API
// over both drivers, so that a test runs the same steps in each.
//
// Chromium (Debian's, 156): driven by playwright-core. Flags (checked headless, no GPU; WebGPU
// then runs on SwiftShader, Chrome's built-in CPU Vulkan — vendor "google", architecture
// "swiftshader": subgroups, no shader-f16):
//   --no-sandbox                 we run as root in CI; chromium refuses to start sandboxed as root
//   --enable-unsafe-webgpu       the only flag WebGPU needs here: without it requestAdapter() is null
//   --disable-quic --no-first-run --disable-background-networking --disable-component-update
//   --disable-sync               no network here: stop chromium from trying hosts it cannot reach
// Not needed (tried; the adapter is the same with or without them): --enable-features=Vulkan,
// --use-angle=swiftshader, --use-webgpu-adapter=swiftshader.
//
// Firefox (Debian's firefox-esr, 153): driven by puppeteer-core over WebDriver BiDi
// (playwright drives only its own patched Firefox builds). WebGPU is wgpu there, over lavapipe
// from mesa-vulkan-drivers: a fallback adapter with shader-f16 and no subgroups — the core
// WebGPU path, and the only browser here with f16. Its prefs: WebGPU on (also in workers), the
// blocklist off (it lists CPU adapters).
//
// Environment: CHROMIUM and FIREFOX override the browser paths.

import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(import.meta.url);

/** The engines the product tests run in. */
export const ENGINES = ['chromium', 'firefox'];

export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--enable-unsafe-webgpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

export const FIREFOX_PREFS = {
  'dom.webgpu.enabled': true,
  'dom.webgpu.workers.enabled': true,
  'gfx.webgpu.ignore-blocklist': true,
};

export function chromiumPath() {
  return process.env.CHROMIUM || '/usr/bin/chromium';
}

export function firefoxPath() {
  return process.env.FIREFOX || '/usr/bin/firefox-esr';
}

function requirePackage(name) {
  try {
    return require(name);
  } catch (e) {
    throw new Error(`${name} is not installed (run \`npm ci\` in tests/): ${e.message}`);
  }
}

function requireBrowser(path, engine, apt) {
  if (!existsSync(path)) {
    throw new Error(`${engine} not found at ${path}: install Debian's package (apt-get install -y ${apt}) ` +
      `or point ${engine.toUpperCase()} at a ${engine} binary`);
  }
}

/**
 * Headless Chromium through playwright-core (the fault suite and the load benchmark use it as
 * is); `extraArgs` go after CHROMIUM_ARGS.
 */
export async function launchChromium({ webgpu = true, extraArgs = [] } = {}) {
  const executablePath = chromiumPath();
  requireBrowser(executablePath, 'chromium', 'chromium');
  const { chromium } = requirePackage('playwright-core');
  const args = webgpu ? CHROMIUM_ARGS : CHROMIUM_ARGS.filter((arg) => arg !== '--enable-unsafe-webgpu');
  return chromium.launch({ executablePath, headless: true, args: [...args, ...extraArgs] });
}

/**
 * Launches `engine` headless and returns `{ engine, version, newContext(), close() }`. A context
 * (its own storage, like a fresh profile) has `engine`, `newPage()`, `setOffline(bool)` and
 * `close()`; a page has `goto(url)`, `evaluate(fn, arg)`, `on(event, handler)` and `close()`.
 * `webgpu: false` starts the browser without WebGPU.
 */
export async function launchBrowser(engine, { webgpu = true } = {}) {
  if (engine === 'chromium') {
    const browser = await launchChromium({ webgpu });
    return {
      engine,
      version: browser.version(),
      async newContext() {
        const context = await browser.newContext();
        return {
          engine,
          newPage: () => context.newPage(),
          setOffline: (offline) => context.setOffline(offline),
          close: () => context.close(),
        };
      },
      close: () => browser.close(),
    };
  }
  if (engine === 'firefox') {
    const executablePath = firefoxPath();
    requireBrowser(executablePath, 'firefox', 'firefox-esr');
    const puppeteer = requirePackage('puppeteer-core');
    const browser = await puppeteer.launch({
      browser: 'firefox',
      executablePath,
      headless: true,
      extraPrefsFirefox: { ...FIREFOX_PREFS, 'dom.webgpu.enabled': webgpu },
    });
    const version = await browser.version();
    return {
      engine,
      version,
      async newContext() {
        const context = await browser.createBrowserContext();
        // Offline is per page here: pages opened later start offline too.
        let offline = false;
        return {
          engine,
          async newPage() {
            const page = await context.newPage();
            if (offline) await page.setOfflineMode(true);
            return page;
          },
          async setOffline(value) {
            offline = value;
            for (const page of await context.pages()) await page.setOfflineMode(value);
          },
          close: () => context.close(),
        };
      },
      close: () => browser.close(),
    };
  }
  throw new Error(`unknown browser engine ${engine}: one of ${ENGINES.join(', ')}`);
}

/** Forward a page's console output and errors to stderr, prefixed, for debugging test runs. */
export function forwardPageLogs(page, label = 'page') {
  page.on('console', (msg) => {
    const location = typeof msg.location === 'function' ? msg.location() : null;
    const where = msg.type() === 'error' && location?.url ? ` (${location.url})` : '';
    process.stderr.write(`[${label} console.${msg.type()}] ${msg.text()}${where}\n`);
  });
  page.on('pageerror', (err) => process.stderr.write(`[${label} error] ${err.stack || err.message}\n`));
  page.on('requestfailed', (req) =>
    process.stderr.write(`[${label} request failed] ${req.url()}: ${req.failure()?.errorText}\n`));
}

/** The text of the first element matching `selector` (null without one). */
export function pageText(page, selector) {
  return page.evaluate((s) => document.querySelector(s)?.textContent ?? null, selector);
}

/**
 * Wait for the page's `#result[data-done]` and return {result, isError}.
 * `result` is the parsed JSON written by web/app.js (and the other test pages).
 */
export async function waitForResult(page, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const done = await page.evaluate(() => {
      const element = document.querySelector('#result[data-done]');
      return element ? { text: element.textContent, error: element.dataset.error === '1' } : null;
    });
    if (done) {
      try {
        return { result: JSON.parse(done.text), isError: done.error };
      } catch {
        throw new Error(`#result does not hold JSON: ${JSON.stringify(done.text)}`);
      }
    }
    if (Date.now() > deadline) throw new Error(`no #result[data-done] within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/**
 * The command line of the measuring scripts (bench-load.mjs, profile-cpu.mjs): `option(name,
 * fallback)` reads `--name VALUE`, and `bundleDir` is the one argument that is neither (default:
 * the synthetic full-size Phi-2 at /tmp/phi2-synth).
 */
export function scriptArgs(args = process.argv.slice(2)) {
  const option = (name, fallback) => {
    const at = args.indexOf(name);
    return at >= 0 ? args[at + 1] : fallback;
  };
  const bundle = args.find((a, i) => !a.startsWith('--') && !args[i - 1]?.startsWith('--'));
  return { option, flag: (name) => args.includes(name), bundleDir: path.resolve(bundle ?? '/tmp/phi2-synth') };
}
