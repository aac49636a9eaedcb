// Shared helpers for the browser tests: launching Debian's chromium through playwright-core.
//
// Flags (checked on Chromium 156, headless, no GPU; WebGPU then runs on SwiftShader, Chrome's
// built-in CPU Vulkan — the adapter reports vendor "google", architecture "swiftshader"):
//   --no-sandbox                 we run as root in CI; chromium refuses to start sandboxed as root
//   --enable-unsafe-webgpu       the only flag WebGPU needs here: without it requestAdapter() is null
//   --disable-quic --no-first-run --disable-background-networking --disable-component-update
//   --disable-sync               no network here: stop chromium from trying hosts it cannot reach
// Not needed (tried; the adapter is the same with or without them): --enable-features=Vulkan,
// --use-angle=swiftshader, --use-webgpu-adapter=swiftshader.
//
// Environment: CHROMIUM overrides the browser path (default /usr/bin/chromium).

import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--enable-unsafe-webgpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

export function chromiumPath() {
  return process.env.CHROMIUM || '/usr/bin/chromium';
}

/** Launch headless chromium; throws a clear error when the browser or playwright-core is missing. */
export async function launchChromium() {
  const executablePath = chromiumPath();
  if (!existsSync(executablePath)) {
    throw new Error(`chromium not found at ${executablePath}: install Debian's package ` +
      '(apt-get install -y chromium) or point CHROMIUM at a chromium binary');
  }
  let chromium;
  try {
    ({ chromium } = require('playwright-core'));
  } catch (e) {
    throw new Error(`playwright-core is not installed (run \`npm ci\` in tests/): ${e.message}`);
  }
  return chromium.launch({ executablePath, headless: true, args: CHROMIUM_ARGS });
}

/** Forward a page's console output and errors to stderr, prefixed, for debugging test runs. */
export function forwardPageLogs(page, label = 'page') {
  page.on('console', (msg) => {
    const where = msg.type() === 'error' && msg.location()?.url ? ` (${msg.location().url})` : '';
    process.stderr.write(`[${label} console.${msg.type()}] ${msg.text()}${where}\n`);
  });
  page.on('pageerror', (err) => process.stderr.write(`[${label} error] ${err.stack || err.message}\n`));
  page.on('requestfailed', (req) =>
    process.stderr.write(`[${label} request failed] ${req.url()}: ${req.failure()?.errorText}\n`));
  page.on('crash', () => process.stderr.write(`[${label}] the page crashed\n`));
}

/**
 * Wait for the page's `#result[data-done]` and return {result, isError}.
 * `result` is the parsed JSON written by web/app.js.
 */
export async function waitForResult(page, timeoutMs) {
  const el = await page.waitForSelector('#result[data-done]', { state: 'attached', timeout: timeoutMs });
  const text = await el.textContent();
  const isError = (await el.getAttribute('data-error')) === '1';
  let result;
  try {
    result = JSON.parse(text);
  } catch {
    throw new Error(`#result does not hold JSON: ${JSON.stringify(text)}`);
  }
  return { result, isError };
}
