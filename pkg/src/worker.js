// @ts-check
// The package's engine worker: hosts one Engine so that loading and generating never block a
// page. It speaks the worker protocol (protocol.d.ts) with worker-engine.js. As a dedicated
// Worker it serves the page that started it; as a SharedWorker (the `shared` load option) it
// serves every tab of the origin that loads the same bundle with the same options: the first
// load loads, later ones attach to the model (or to the load under way), and the model is
// freed when the last tab has unloaded it.

import { Engine } from './engine.js';
import { abortError, Phi2Error } from './errors.js';
import { deviceLost } from './webgpu.js';

/**
 * @typedef {import('./protocol.js').WorkerRequest} WorkerRequest
 * @typedef {import('./protocol.js').WorkerReply} WorkerReply
 * @typedef {import('./index.js').LoadProgress} LoadProgress
 * @typedef {{ postMessage(reply: WorkerReply): void }} Port
 * @typedef {{ port: Port, id: number, controller: AbortController, delivered: number, wake: () => void }} Running
 * @typedef {{ port: Port, running: Map<number, Running> }} Client
 */

/**
 * Tokens a generation may run ahead of its consumer: enough to hide a message round trip
 * behind the next token's computation, few enough that a stop wastes little. Without a bound
 * a device faster than the round trip finished the whole budget before a stop arrived (a step
 * on the CPU backend never yields to the worker's event loop, so messages wait until it must).
 */
const TOKENS_AHEAD = 4;

/** @type {Engine | null} */
let engine = null;
/**
 * The load under way: the clients waiting for it (each with its progress callback) and what
 * aborts it once none is left.
 * @type {{ promise: Promise<Engine>, waiting: Map<Running, (event: LoadProgress) => void>, controller: AbortController } | null}
 */
let loading = null;
/** @type {Set<Client>} Clients the loaded model serves. */
const attached = new Set();
/** Model calls (generations, benches) run one after another; 'pull' and 'abort' act at once. */
let queue = Promise.resolve();
/** @type {Set<Running>} Generations and benches queued or running, of every client. */
const modelRequests = new Set();

/**
 * Resolves once the consumer has taken enough of the `sent` tokens, or the request is aborted.
 * @param {Running} request
 * @param {number} sent
 */
async function untilPulled(request, sent) {
  while (sent >= request.delivered + TOKENS_AHEAD && !request.controller.signal.aborted) {
    await new Promise((resolve) => (request.wake = () => resolve(undefined)));
  }
}

/**
 * The model, loaded by this request, or by another tab before it or under way (which it then
 * joins: `attached`).
 * @param {Running} request
 * @param {Extract<WorkerRequest, { type: 'load' }>} message
 * @returns {Promise<{ loaded: Engine, attached: boolean }>}
 */
async function loadFor(request, message) {
  const onProgress = (/** @type {LoadProgress} */ event) => request.port.postMessage({ type: 'progress', id: request.id, event });
  if (engine) return { loaded: engine, attached: true };
  const attachedToLoad = loading !== null;
  if (!loading) {
    const controller = new AbortController();
    const waiting = new Map();
    const promise = Engine.load(message.url, {
      ...message.options,
      signal: controller.signal,
      onProgress: (event) => waiting.forEach((report) => report(event)),
    });
    loading = { promise, waiting, controller };
    promise.then((loaded) => (engine = loaded), () => {}).finally(() => (loading = null));
  }
  const load = loading;
  load.waiting.set(request, onProgress);
  const left = () => {
    // A client that stops waiting leaves the load to the others; the last one ends it.
    load.waiting.delete(request);
    if (load.waiting.size === 0) load.controller.abort(new Phi2Error('AbortError', 'aborted by the caller'));
  };
  const { signal } = request.controller;
  try {
    const loaded = await new Promise((resolve, reject) => {
      signal.addEventListener('abort', () => reject(abortError(signal)), { once: true });
      if (signal.aborted) reject(abortError(signal));
      load.promise.then(resolve, reject);
    });
    return { loaded, attached: attachedToLoad };
  } finally {
    left();
  }
}

/**
 * Runs a generation, chat or bench of `request` once the model is free. With `whenBusy:
 * 'cancel'` it first ends every other client's.
 * @param {Client} client
 * @param {Running} request
 * @param {Extract<WorkerRequest, { type: 'generate' | 'chat' | 'bench' }>} message
 */
async function runOnModel(client, request, message) {
  if (message.whenBusy === 'cancel') {
    for (const other of modelRequests) {
      if (other.port !== client.port) other.controller.abort(new Phi2Error('AbortError', 'ended by another tab\'s generation'));
    }
  }
  modelRequests.add(request);
  const turn = queue.then(() => serveModel(client, request, message));
  queue = turn.catch(() => {});
  try {
    await turn;
  } finally {
    modelRequests.delete(request);
  }
}

/**
 * @param {Client} client
 * @param {Running} request
 * @param {Extract<WorkerRequest, { type: 'generate' | 'chat' | 'bench' }>} message
 */
async function serveModel(client, request, message) {
  const { port, id } = request;
  const { signal } = request.controller;
  if (!engine || !attached.has(client)) throw new Phi2Error('StateError', 'no model is loaded; call Phi2.load() first');
  if (message.type === 'bench') {
    port.postMessage({ type: 'result', id, value: await engine.bench(message.options) });
    return;
  }
  const items = message.type === 'generate'
    ? engine.generate(message.prompt, { ...message.options, signal })
    : engine.chat(message.request, { signal });
  for (let sent = 0; ; sent++) {
    await untilPulled(request, sent);
    const next = await items.next();
    if (next.done) {
      port.postMessage({ type: 'result', id, value: next.value, stats: engine.lastStats });
      return;
    }
    port.postMessage({ type: 'item', id, value: next.value });
  }
}

/**
 * Detaches `client`: ends its requests, and frees the model once no client is left.
 * @param {Client} client
 */
async function detach(client) {
  for (const request of client.running.values()) request.controller.abort(new Phi2Error('AbortError', 'the tab unloaded the model'));
  if (!attached.delete(client) || attached.size > 0 || !engine) return;
  const unloading = engine;
  engine = null;
  await (queue = queue.then(() => unloading.unload()).catch(() => {}));
}

/**
 * @param {Client} client
 * @param {WorkerRequest} message
 */
async function handle(client, message) {
  const { port } = client;
  const { id } = message;
  const request = /** @type {Running} */ (client.running.get(id));
  try {
    if (message.type === 'load') {
      const { loaded, attached: joined } = await loadFor(request, message);
      attached.add(client);
      port.postMessage({ type: 'result', id, value: { ...loaded.info, shared: isShared, attached: joined } });
    } else if (message.type === 'generate' || message.type === 'chat' || message.type === 'bench') {
      await runOnModel(client, request, message);
    } else if (message.type === 'unload') {
      await detach(client);
      port.postMessage({ type: 'result', id, value: null });
    } else {
      throw new Phi2Error('InternalError', `unknown request "${/** @type {any} */ (message).type}"`);
    }
  } catch (error) {
    port.postMessage({ type: 'error', id, error: Phi2Error.from(error).toJSON() });
    if (isShared && deviceLost()) closeLostWorker(Phi2Error.from(error));
  } finally {
    client.running.delete(id);
  }
}

/** @type {Set<Client>} Every connected client (a SharedWorker has one per tab). */
const clients = new Set();

/**
 * A shared worker whose GPU device is lost can never get another (wgpu makes one per realm):
 * it tells every tab, then closes, so that the next load starts a new worker.
 * @param {Phi2Error} error
 */
function closeLostWorker(error) {
  for (const client of clients) client.port.postMessage({ type: 'closed', id: 0, error: error.toJSON() });
  self.close();
}

/**
 * Serves the requests arriving on `port` (the dedicated worker's scope, or a tab's port).
 * @param {Port & { onmessage: ((event: MessageEvent<WorkerRequest>) => void) | null, addEventListener?: Function }} port
 */
function serve(port) {
  /** @type {Client} */
  const client = { port, running: new Map() };
  clients.add(client);
  port.onmessage = ({ data }) => {
    const request = client.running.get(data.id);
    if (data.type === 'abort' || data.type === 'pull') {
      // Also reaches a request still queued behind another: it then ends as soon as it starts.
      if (!request) return;
      if (data.type === 'abort') request.controller.abort(new Phi2Error('AbortError', 'aborted by the caller'));
      else request.delivered = data.delivered;
      request.wake();
      return;
    }
    client.running.set(data.id, { port, id: data.id, controller: new AbortController(), delivered: 0, wake: () => {} });
    handle(client, data);
  };
  // A closed tab's port (where browsers report it) frees its share of the model.
  port.addEventListener?.('close', () => {
    clients.delete(client);
    detach(client);
  });
}

const isShared = typeof SharedWorkerGlobalScope !== 'undefined' && self instanceof SharedWorkerGlobalScope;
if (isShared) {
  /** @type {any} */ (self).onconnect = (/** @type {MessageEvent} */ event) => serve(event.ports[0]);
} else {
  serve(/** @type {any} */ (self));
}
