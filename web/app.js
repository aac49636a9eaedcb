// phi2-web demo page. Plain ES module: no bundler, no framework. Builds on the package in
// ./pkg/ (pkg/src/ plus the wasm build, copied there by scripts/build-pkg.sh).
//
// Query parameters make the page scriptable (used by the browser tests):
//   ?model=URL&prompt=TEXT&max=N&backend=auto|webgpu|cpu&worker=0|1&temperature=T&autorun=1
//   &kernels=auto|portable|subgroups (the package's `kernels` option)&json=1 (JSON output)
//   &shared=1 (one engine for all tabs: the package's `shared` option)
// With autorun=1 the page loads the model (in a worker unless worker=0), collects every progress
// event, generates from the prompt as given (no format template; temperature 0 and 16 tokens
// unless given), then writes
//   JSON.stringify({ generatedIds, text, backend, stats, progress, info })
// into <pre id="result"> and sets data-done="1" on it. On any error it writes
//   JSON.stringify({ error: { name, message, details } })
// there and sets data-done="1" and data-error="1". `window.phi2Demo` = { Phi2, model: () => … }.

const params = new URLSearchParams(location.search);
const AUTORUN = params.get('autorun') === '1';
const $ = (id) => document.getElementById(id);
const ui = {
  webgpuNotice: $('webgpu-notice'),
  status: $('status'),
  error: $('error'),
  modelUrl: $('model-url'),
  backend: $('backend'),
  loadBtn: $('load-btn'),
  abortBtn: $('abort-btn'),
  cached: $('cached'),
  deleteCacheBtn: $('delete-cache-btn'),
  shared: $('shared'),
  cachedBundles: $('cached-bundles'),
  progressBox: $('progress-box'),
  progress: $('progress'),
  progressText: $('progress-text'),
  backendInfo: $('backend-info'),
  format: $('format'),
  example: $('example'),
  newChatBtn: $('new-chat-btn'),
  promptLabel: $('prompt-label'),
  prompt: $('prompt'),
  temperature: $('temperature'),
  topP: $('top-p'),
  maxTokens: $('max-tokens'),
  jsonOutput: $('json-output'),
  generateBtn: $('generate-btn'),
  stopBtn: $('stop-btn'),
  output: $('output'),
  stats: $('stats'),
  result: $('result'),
};

const state = {
  /** The package module (./pkg/index.js), once imported. */
  pkg: null,
  /** The loaded Phi2, or null. */
  model: null,
  /** 'idle' | 'loading' | 'generating' */
  phase: 'idle',
  /** AbortController of the running load or generation. */
  controller: null,
  /** Run the engine in a Web Worker (?worker=0 turns it off). */
  worker: params.get('worker') !== '0',
  /** The package's `kernels` option (?kernels=portable, e.g. around a driver's subgroup bug). */
  kernels: params.get('kernels') ?? 'auto',
  /** The CPU backend's threads (?threads=N; by default the package's: every core it may use). */
  threads: params.has('threads') ? Number(params.get('threads')) : undefined,
  hasWebGPU: null,
  /** Chat mode: the transcript sent to the model, and its turns for display. */
  transcript: '',
  turns: [],
};

// --- prompt formats ----------------------------------------------------------------------------

const FORMATS = {
  instruct: {
    label: 'Question or instruction',
    build: (text) => ({ prompt: `Instruct: ${text}\nOutput:`, stop: ['\nInstruct:'] }),
    examples: [
      'Explain why the sky is blue in two sentences.',
      'What is a prime number? Give three examples.',
      'Write a short poem about the sea.',
      'Alice has 5 apples and gives 2 to Bob. How many apples does she have left? Explain step by step.',
    ],
  },
  chat: {
    label: 'Your message (you are Alice, the model is Bob)',
    build: (text) => ({ prompt: `${state.transcript}Alice: ${text}\nBob:`, stop: ['\nAlice:', '\nBob:'] }),
    examples: [
      'Hi Bob! Can you recommend a good book about space?',
      "What's a quick, healthy breakfast idea?",
      'Can you explain what a neural network is, simply?',
    ],
  },
  code: {
    label: 'Code to complete',
    build: (text) => ({ prompt: text, stop: [] }),
    examples: [
      'def is_prime(n):\n    """Return True if n is a prime number, else False."""\n',
      'def fibonacci(n):\n    """Return a list of the first n Fibonacci numbers."""\n',
      'def reverse_words(sentence: str) -> str:\n    """Reverse the order of the words in a sentence."""\n',
    ],
  },
  raw: {
    label: 'Text to continue',
    build: (text) => ({ prompt: text, stop: [] }),
    examples: [
      'The three most important inventions of the 20th century are',
      'Once upon a time, in a small village by the sea,',
    ],
  },
};

function exampleTitle(text) {
  const line = text.split('\n')[0];
  return line.length > 70 ? `${line.slice(0, 67)}…` : line;
}

function isExampleText(text) {
  return text.trim() === '' || Object.values(FORMATS).some((f) => f.examples.includes(text));
}

function showFormat({ keepPrompt = false } = {}) {
  const format = FORMATS[ui.format.value] ?? FORMATS.raw;
  ui.promptLabel.textContent = format.label;
  ui.newChatBtn.hidden = ui.format.value !== 'chat';
  ui.example.replaceChildren(new Option('Pick an example…', ''), ...format.examples.map((text, i) => new Option(exampleTitle(text), String(i))));
  // Replace the prompt only when it holds no text of the user's own.
  if (!keepPrompt && isExampleText(ui.prompt.value)) ui.prompt.value = format.examples[0] ?? '';
  if (ui.format.value === 'chat') renderChat();
}

// --- status, errors, results -------------------------------------------------------------------

function setStatus(text, kind = '') {
  ui.status.textContent = text;
  ui.status.className = kind;
}

const FRIENDLY = {
  LoadError: () => 'Could not download the model: check the model URL and your connection.',
  IntegrityError: () => 'A downloaded chunk was corrupt (it does not match the bundle\'s checksum); load again to download it anew.',
  FormatError: () => 'This URL does not hold a phi2-web bundle (or the bundle is malformed): make one with `phi2 convert`.',
  DeviceError: () => 'The GPU failed or is too small for this model: try the CPU backend, or close other tabs that use the GPU.',
  OutOfMemoryError: () => 'Out of memory: close other tabs or use a smaller model.',
  UnsupportedError: () => 'This browser lacks something the model needs here (WebGPU, module workers or storage): try the backend "auto" or "cpu".',
  StateError: () => 'The model is not ready for that (not loaded yet, unloaded, or busy): load it again.',
  OptionError: (details) => {
    if (details?.option === 'prompt') return 'The prompt was not accepted (too long for the model\'s context? In chat, press "New chat").';
    return details?.option ? `The option "${details.option}" has a value the model does not accept.` : 'An option has a value the model does not accept.';
  },
  AbortError: () => 'Loading cancelled.',
  InternalError: () => 'The engine crashed: load the model again (the browser console may say more).',
};

/** { name, message, details } of anything thrown (a Phi2Error, or e.g. a failed import). */
function errorData(error) {
  if (error == null) return { name: 'InternalError', message: 'unknown error', details: {} };
  if (typeof error === 'string') return { name: 'InternalError', message: error, details: {} };
  let message = error.message;
  if (typeof message !== 'string') {
    try {
      message = JSON.stringify(error);
    } catch {
      message = String(error);
    }
  }
  const name = typeof error.name === 'string' && error.name ? error.name : 'InternalError';
  const details = error.details && typeof error.details === 'object' ? { ...error.details } : {};
  return { name, message, details };
}

function showError(error) {
  const { name, message, details } = errorData(error);
  const friendly = (FRIENDLY[name] ?? (() => `Something went wrong (${name}).`))(details);
  const head = document.createElement('strong');
  head.textContent = friendly;
  const raw = document.createElement('div');
  raw.className = 'raw';
  raw.textContent = `${name}: ${message}`;
  const parts = [head, raw];
  const facts = Object.entries(details).filter(([, v]) => v !== undefined && v !== null && v !== '');
  if (facts.length > 0) {
    const more = document.createElement('div');
    more.className = 'details';
    more.textContent = facts.map(([k, v]) => `${k}: ${v}`).join(' · ');
    parts.push(more);
  }
  ui.error.replaceChildren(...parts);
  ui.error.hidden = false;
}

function clearError() {
  ui.error.hidden = true;
  ui.error.replaceChildren();
}

function writeResult(value, isError = false) {
  ui.result.textContent = JSON.stringify(value);
  if (isError) ui.result.dataset.error = '1';
  else delete ui.result.dataset.error;
  ui.result.dataset.done = '1';
}

function writeErrorResult(error) {
  writeResult({ error: errorData(error) }, true);
}

// --- busy state ----------------------------------------------------------------------------------

function setPhase(phase) {
  state.phase = phase;
  const loading = phase === 'loading';
  const generating = phase === 'generating';
  ui.loadBtn.disabled = loading || generating || !state.pkg;
  ui.abortBtn.hidden = !loading;
  ui.abortBtn.disabled = !loading;
  ui.modelUrl.disabled = loading;
  ui.backend.disabled = loading;
  ui.deleteCacheBtn.disabled = loading || !state.pkg;
  ui.generateBtn.disabled = phase !== 'idle' || !state.model;
  ui.stopBtn.disabled = !generating;
  ui.newChatBtn.disabled = generating;
  ui.format.disabled = generating;
}

// --- numbers -------------------------------------------------------------------------------------

const MB = 1e6;
const mb = (bytes) => (bytes / MB).toFixed(bytes < 10 * MB ? 2 : 1);

function duration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return '–';
  if (seconds < 60) return `${Math.ceil(seconds)} s`;
  const m = Math.floor(seconds / 60);
  const s = Math.round(seconds - 60 * m);
  if (m < 60) return `${m} min ${String(s).padStart(2, '0')} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, '0')} min`;
}

const fixed = (value, digits = 1) => (Number.isFinite(value) ? value.toFixed(digits) : '–');

// --- the cache indicator -------------------------------------------------------------------------

/** "1.57 GB", or below a gigabyte "2.07 MB". */
const size = (bytes) => (bytes >= 1e9 ? `${(bytes / 1e9).toFixed(2)} GB` : `${mb(bytes)} MB`);

/** "1.57 GB to download, 2.9 GB free; needs ~1.7 GB of GPU memory at 2048 tokens". */
function describeRequirements(needs) {
  const { download, storage, memory, backend } = needs;
  const parts = [download.bytesToDownload === 0
    ? 'cached ✓ (loads without the network)'
    : `${size(download.bytesToDownload)} to download${download.cachedBytes > 0 ? ` (${size(download.cachedBytes)} cached)` : ''}`];
  if (storage && download.bytesToDownload > 0) {
    // Chromium reports a fixed quota (usage + 10 GiB): no figure is better than a false one.
    const free = storage.quotaIsFixed ? 'free storage not reported' : `${size(storage.availableBytes)} free`;
    parts[0] += `, ${free}${storage.persisted ? ' (persistent)' : ''}`;
  }
  const where = backend === 'webgpu' ? 'GPU memory' : 'memory (CPU)';
  return `${parts[0]}; needs ~${size(memory.totalBytes)} of ${where} at ${memory.contextLength} tokens`;
}

let cacheCheck = 0;
/** Shows what loading the model at the URL needs (and whether it fits), and the cached models. */
async function refreshCached() {
  const id = ++cacheCheck;
  const url = ui.modelUrl.value.trim();
  if (!state.pkg || !url) {
    ui.cached.textContent = '';
    ui.cached.className = '';
    return;
  }
  let text;
  let kind = '';
  let needs = null;
  try {
    needs = await state.pkg.Phi2.requirements(url, { backend: ui.backend.value, kernels: state.kernels });
    text = describeRequirements(needs);
    if (!needs.fits) {
      text += ` — will not load: ${needs.reasons.map((r) => r.message).join('; ')}`;
      kind = 'no';
    } else if (needs.download.bytesToDownload === 0) {
      kind = 'yes';
    }
  } catch (error) {
    text = `cannot tell what the model needs (${error?.message ?? error})`;
  }
  if (id !== cacheCheck) return; // a newer check is under way
  ui.cached.textContent = text;
  ui.cached.className = kind;
  await showCachedBundles(needs?.url);
}

/** Lists the cached models but `current` (a manifest URL), each with a button that deletes it. */
async function showCachedBundles(current) {
  let bundles = [];
  try {
    bundles = (await state.pkg.Phi2.cachedBundles()).filter((bundle) => bundle.url !== current);
  } catch (error) {
    console.warn('phi2-web: could not list the cached models:', error);
  }
  const rows = bundles.map((bundle) => {
    const row = document.createElement('div');
    const label = document.createElement('span');
    label.textContent = `Also cached: ${bundle.url} (${size(bundle.bytes)}${bundle.complete ? '' : ', incomplete'})`;
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.className = 'danger';
    remove.textContent = 'Delete to free space';
    remove.addEventListener('click', async () => {
      remove.disabled = true;
      try {
        await state.pkg.Phi2.deleteCache(bundle.url);
      } catch (error) {
        showError(error);
      }
      await refreshCached();
    });
    row.append(label, remove);
    return row;
  });
  ui.cachedBundles.replaceChildren(...rows);
  ui.cachedBundles.hidden = rows.length === 0;
}

async function onDeleteCache() {
  const url = ui.modelUrl.value.trim();
  if (!state.pkg || !url) return;
  clearError();
  try {
    const removed = await state.pkg.Phi2.deleteCache(url);
    setStatus(removed ? `Deleted the cached copy of ${url}.` : `Nothing of ${url} was in the cache.`);
  } catch (error) {
    showError(error);
  }
  await refreshCached();
}

// --- loading -------------------------------------------------------------------------------------

const PHASE_TEXT = {
  wait: 'Waiting for another tab to download the model',
  download: 'Downloading',
  cache: 'Reading from the cache',
  upload: 'Verifying and placing the weights',
  compile: 'Warming up (compiling the GPU kernels)',
};

/** Shows load progress; keeps a window of download samples for the rate and ETA. */
class ProgressView {
  constructor() {
    this.samples = [];
    this.received = 0;
    this.placed = 0;
    this.last = null;
    this.lastRender = 0;
    ui.progressBox.hidden = false;
    ui.progress.max = 1;
    ui.progress.value = 0;
    ui.progressText.textContent = 'Fetching the manifest…';
  }

  update(event) {
    const now = performance.now();
    this.last = event;
    if (event.phase === 'upload') this.placed = event.chunk;
    else if (event.phase !== 'compile') this.received = Math.max(this.received, event.chunk);
    if (event.phase === 'download') {
      this.samples.push({ t: now, bytes: event.loadedBytes });
      while (this.samples.length > 2 && now - this.samples[0].t > 5000) this.samples.shift();
    }
    if (event.phase === 'compile' || now - this.lastRender > 100) this.render(now);
  }

  rate() {
    const first = this.samples[0];
    const last = this.samples[this.samples.length - 1];
    if (!first || last.t - first.t < 500) return null;
    return ((last.bytes - first.bytes) * 1000) / (last.t - first.t);
  }

  render(now = performance.now()) {
    this.lastRender = now;
    const event = this.last;
    if (!event) return;
    const { phase, loadedBytes, totalBytes, chunks } = event;
    const fraction = totalBytes > 0 ? loadedBytes / totalBytes : 0;
    if (phase === 'compile') ui.progress.removeAttribute('value'); // indeterminate
    else ui.progress.value = fraction;
    const parts = [`${PHASE_TEXT[phase] ?? phase}`, `${mb(loadedBytes)} / ${mb(totalBytes)} MB (${Math.floor(fraction * 100)}%)`];
    if (phase !== 'compile') parts.push(`chunks: ${this.received} received, ${this.placed} placed of ${chunks}`);
    const rate = this.rate();
    if (phase === 'download' && rate !== null && loadedBytes < totalBytes) {
      parts.push(`${mb(rate)} MB/s`, `ETA ${rate > 0 ? duration((totalBytes - loadedBytes) / rate) : '–'}`);
    }
    ui.progressText.textContent = parts.join(' · ');
  }

  done(text) {
    ui.progress.max = 1;
    ui.progress.value = 1;
    ui.progressText.textContent = text;
  }
}

function showModelInfo(model) {
  const info = model.info ?? {};
  const cpu = `the CPU (slow; ${info.threads === 1 ? 'one thread' : `${info.threads} threads`})`;
  const backend = info.backend === 'webgpu' ? 'WebGPU' : info.backend === 'cpu' ? cpu : String(info.backend);
  const line = document.createElement('div');
  line.textContent = `Running on ${backend} · context ${info.contextLength ?? '?'} tokens · ` +
    `${mb(info.totalBytes ?? 0)} MB of weights · loaded in ${fixed((info.loadMs ?? 0) / 1000)} s` +
    (state.worker ? '' : ' · on the page thread') +
    (info.shared ? ` · shared with other tabs${info.attached ? ' (attached to their model)' : ''}` : '') +
    (info.persisted ? ' · cache kept under storage pressure' : '');
  const parts = [line];
  if (info.device) {
    const device = document.createElement('div');
    device.textContent = `Adapter: ${info.device}`;
    parts.push(device);
  }
  for (const warning of info.warnings ?? []) {
    const w = document.createElement('div');
    w.className = 'warn';
    w.textContent = `⚠ ${warning}`;
    parts.push(w);
  }
  ui.backendInfo.replaceChildren(...parts);
  ui.backendInfo.hidden = false;
}

/** Loads the model at `url` (unloading the current one first); `onEvent` sees every progress event. */
async function loadModel(url, backend, onEvent = () => {}) {
  const { Phi2 } = state.pkg;
  if (state.model) {
    const old = state.model;
    state.model = null;
    ui.backendInfo.hidden = true;
    try {
      await old.unload();
    } catch (error) {
      console.warn('phi2-web: unloading the previous model failed:', error);
    }
  }
  const controller = new AbortController();
  state.controller = controller;
  setPhase('loading');
  setStatus(`Loading ${url}…`);
  const view = new ProgressView();
  try {
    const model = await Phi2.load(url, {
      backend,
      worker: state.worker,
      kernels: state.kernels,
      threads: state.threads,
      cache: true,
      // Ask that the 1.6 GB stay cached under storage pressure (model.info.persisted says).
      persist: true,
      shared: ui.shared.checked,
      signal: controller.signal,
      onProgress: (event) => {
        onEvent(event);
        view.update(event);
      },
    });
    state.model = model;
    view.done(`Loaded ${mb(model.info?.totalBytes ?? 0)} MB in ${fixed((model.info?.loadMs ?? 0) / 1000)} s.`);
    showModelInfo(model);
    setStatus(`Model ready on ${model.info?.backend ?? '?'}.`, 'ok');
    return model;
  } catch (error) {
    view.render();
    setStatus(error?.name === 'AbortError' ? 'Loading cancelled.' : 'Loading failed.');
    throw error;
  } finally {
    if (state.controller === controller) state.controller = null;
    setPhase('idle');
    if (!AUTORUN) refreshCached();
  }
}

async function onLoad() {
  if (state.phase !== 'idle' || !state.pkg) return;
  clearError();
  try {
    await loadModel(ui.modelUrl.value.trim(), ui.backend.value);
  } catch (error) {
    showError(error);
  }
}

// --- generating ----------------------------------------------------------------------------------

function formatStats(stats) {
  if (!stats) return '';
  return [
    `prompt ${stats.promptTokens} tokens (${stats.reusedTokens} reused)`,
    `generated ${stats.generatedTokens}`,
    `time to first token ${fixed(stats.timeToFirstTokenMs / 1000, 2)} s`,
    `prefill ${fixed(stats.prefillTokensPerS)} tok/s`,
    `decode ${fixed(stats.decodeTokensPerS)} tok/s`,
    `stop: ${stats.stopReason ?? '–'}`,
  ].join(' · ');
}

function nearBottom(el) {
  return el.scrollHeight - el.scrollTop - el.clientHeight < 40;
}

/** Output area for a plain prompt: the prompt (muted) and the text node the reply streams into. */
function plainOutput(prompt) {
  const promptSpan = document.createElement('span');
  promptSpan.className = 'prompt';
  promptSpan.textContent = prompt;
  const reply = document.createTextNode('');
  ui.output.replaceChildren(promptSpan, reply);
  return reply;
}

/** Chat view: every turn of the transcript; returns the text node of the last reply. */
function renderChat() {
  const nodes = [];
  let reply = null;
  for (const turn of state.turns) {
    const div = document.createElement('div');
    div.className = 'turn';
    const alice = document.createElement('span');
    alice.className = 'speaker';
    alice.textContent = 'Alice: ';
    const bob = document.createElement('span');
    bob.className = 'speaker';
    bob.textContent = '\nBob: ';
    reply = document.createTextNode(turn.reply);
    div.append(alice, turn.message, bob, reply);
    nodes.push(div);
  }
  ui.output.replaceChildren(...nodes);
  ui.output.scrollTop = ui.output.scrollHeight;
  return reply;
}

function onNewChat() {
  if (state.phase === 'generating') return;
  state.transcript = '';
  state.turns = [];
  ui.output.replaceChildren();
  ui.stats.textContent = '';
  setStatus('New chat.');
}

/**
 * Streams `prompt` into `sink` (a text node), with live figures in #stats. Returns
 * { generatedIds, text, stats }.
 */
async function runGeneration(model, prompt, options, sink) {
  const controller = new AbortController();
  state.controller = controller;
  setPhase('generating');
  setStatus(`Generating on ${model.info?.backend ?? '?'}…`);
  ui.stats.textContent = 'Reading the prompt…';
  const generatedIds = [];
  let text = '';
  const started = performance.now();
  let firstAt = null;
  let lastRender = 0;
  try {
    for await (const { text: piece, tokenId } of model.generate(prompt, { ...options, signal: controller.signal })) {
      const now = performance.now();
      firstAt ??= now;
      generatedIds.push(tokenId);
      if (piece) {
        const stick = nearBottom(ui.output);
        text += piece;
        sink.appendData(piece);
        if (stick) ui.output.scrollTop = ui.output.scrollHeight;
      }
      if (now - lastRender > 100) {
        lastRender = now;
        const n = generatedIds.length;
        const rate = n > 1 ? ((n - 1) * 1000) / (now - firstAt) : NaN;
        ui.stats.textContent = `${n} tokens · ${fixed(rate)} tok/s · time to first token ${fixed((firstAt - started) / 1000, 2)} s`;
      }
    }
    const stats = model.stats;
    ui.stats.textContent = formatStats(stats);
    setStatus(stats?.stopReason === 'cancelled' ? 'Stopped.' : 'Done.', 'ok');
    return { generatedIds, text, stats };
  } catch (error) {
    ui.stats.textContent = '';
    setStatus('Generation failed.');
    throw error;
  } finally {
    if (state.controller === controller) state.controller = null;
    setPhase('idle');
  }
}

function readNumber(input, name) {
  const value = Number(input.value);
  if (input.value.trim() === '' || !Number.isFinite(value)) {
    throw Object.assign(new Error(`${name}: "${input.value}" is not a number`), { name: 'OptionError', details: { option: name } });
  }
  return value;
}

async function onGenerate() {
  if (state.phase !== 'idle' || !state.model) return;
  clearError();
  const model = state.model;
  const format = ui.format.value;
  const message = ui.prompt.value;
  try {
    const options = {
      temperature: readNumber(ui.temperature, 'temperature'),
      topP: readNumber(ui.topP, 'topP'),
      maxTokens: readNumber(ui.maxTokens, 'maxTokens'),
    };
    const { prompt, stop } = (FORMATS[format] ?? FORMATS.raw).build(message);
    // A constrained answer ends when its JSON is complete; a stop string could cut it.
    if (ui.jsonOutput.checked) options.responseFormat = { type: 'json_object' };
    else if (stop.length > 0) options.stop = stop;
    if (format === 'chat') {
      if (message.trim() === '') return;
      state.turns.push({ message, reply: '' });
      const sink = renderChat();
      let result;
      try {
        result = await runGeneration(model, prompt, options, sink);
      } catch (error) {
        state.turns.pop();
        renderChat();
        throw error;
      }
      // The reply as generated (minus trailing blanks) keeps the next turn's prompt sharing
      // the longest possible start with this one, so its KV cache is reused.
      const reply = result.text.replace(/\s+$/, '');
      state.transcript = `${prompt}${reply}\n`;
      state.turns[state.turns.length - 1].reply = reply.replace(/^ /, '');
      renderChat();
      ui.prompt.value = '';
    } else {
      const sink = plainOutput(prompt);
      await runGeneration(model, prompt, options, sink);
    }
  } catch (error) {
    showError(error);
  } finally {
    ui.prompt.focus();
  }
}

function onStop() {
  state.model?.stop();
  state.controller?.abort();
}

function onAbort() {
  if (state.phase === 'loading') state.controller?.abort();
}

// --- autorun (the automated tests' entry) ---------------------------------------------------------

async function autorun() {
  const progress = [];
  try {
    if (!state.pkg) throw state.pkgError;
    const url = params.get('model') ?? ui.modelUrl.value;
    const backend = params.get('backend') ?? 'auto';
    const model = await loadModel(url, backend, (event) => progress.push({ ...event }));
    const prompt = params.get('prompt') ?? ui.prompt.value;
    const options = {
      maxTokens: params.has('max') ? Number(params.get('max')) : 16,
      temperature: params.has('temperature') ? Number(params.get('temperature')) : 0,
    };
    if (params.get('json') === '1') options.responseFormat = { type: 'json_object' };
    const { generatedIds, text, stats } = await runGeneration(model, prompt, options, plainOutput(prompt));
    writeResult({ generatedIds, text, backend: model.info?.backend, stats, progress, info: model.info });
  } catch (error) {
    showError(error);
    writeErrorResult(error);
  }
}

// Errors that escape everything else: show them, and in autorun make sure a waiting test sees them.
function onUncaught(error) {
  console.error('phi2-web page:', error);
  showError(error);
  if (AUTORUN && !ui.result.dataset.done) writeErrorResult(error);
}
window.addEventListener('error', (event) => onUncaught(event.error ?? event.message));
window.addEventListener('unhandledrejection', (event) => onUncaught(event.reason));

// --- service worker ---------------------------------------------------------------------------------

function registerServiceWorker() {
  try {
    if (!('serviceWorker' in navigator)) return;
    navigator.serviceWorker.register('./sw.js').catch((error) => {
      console.warn('phi2-web: the service worker was not registered (no offline use):', error);
    });
  } catch (error) {
    console.warn('phi2-web: the service worker was not registered (no offline use):', error);
  }
}

// --- start-up -----------------------------------------------------------------------------------------

if (params.has('model')) ui.modelUrl.value = params.get('model');
if (params.has('backend') && [...ui.backend.options].some((o) => o.value === params.get('backend'))) {
  ui.backend.value = params.get('backend');
}
if (params.has('max')) ui.maxTokens.value = params.get('max');
ui.shared.checked = params.get('shared') === '1';
if (params.has('temperature')) ui.temperature.value = params.get('temperature');
if (AUTORUN || params.has('prompt')) ui.format.value = 'raw';
if (params.has('prompt')) ui.prompt.value = params.get('prompt');
showFormat({ keepPrompt: params.has('prompt') });
setPhase('idle');

ui.loadBtn.addEventListener('click', onLoad);
ui.abortBtn.addEventListener('click', onAbort);
ui.deleteCacheBtn.addEventListener('click', onDeleteCache);
ui.generateBtn.addEventListener('click', onGenerate);
ui.stopBtn.addEventListener('click', onStop);
ui.newChatBtn.addEventListener('click', onNewChat);
ui.format.addEventListener('change', () => showFormat());
ui.example.addEventListener('change', () => {
  const examples = (FORMATS[ui.format.value] ?? FORMATS.raw).examples;
  const picked = examples[Number(ui.example.value)];
  if (ui.example.value !== '' && picked !== undefined) ui.prompt.value = picked;
  ui.example.value = '';
  ui.prompt.focus();
});
ui.prompt.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    onGenerate();
  }
});
let cacheTimer = null;
ui.modelUrl.addEventListener('input', () => {
  clearTimeout(cacheTimer);
  cacheTimer = setTimeout(refreshCached, 300);
});
ui.backend.addEventListener('change', refreshCached);

registerServiceWorker();

try {
  state.pkg = await import('./pkg/index.js');
  window.phi2Demo = { Phi2: state.pkg.Phi2, model: () => state.model };
} catch (error) {
  console.error('phi2-web: could not import ./pkg/index.js:', error);
  state.pkgError = {
    name: 'LoadError',
    message: `the package ./pkg/index.js could not be loaded (${error?.message ?? error}); build it with scripts/build-pkg.sh`,
    details: { file: 'pkg/index.js' },
  };
  window.phi2Demo = { Phi2: null, model: () => null };
}
setPhase('idle');

if (state.pkg) {
  // Not awaited by autorun: the notice is for people; the load itself decides the backend.
  state.pkg.Phi2.hasWebGPU().then((has) => {
    state.hasWebGPU = has;
    ui.webgpuNotice.hidden = has;
  }, () => {
    ui.webgpuNotice.hidden = false;
  });
  // Autorun (the tests) leaves the network to the load alone.
  if (!AUTORUN) refreshCached();
}

if (AUTORUN) {
  setStatus('Autorun: loading the model…');
  autorun();
} else if (state.pkg) {
  setStatus('Ready: press Load.');
} else {
  setStatus('The package is missing.');
  showError(state.pkgError);
}
