// @ts-check
// The package's module Web Worker: hosts one Engine so that loading and generating never block
// the page. It speaks the worker protocol (protocol.d.ts) with worker-engine.js on the page.

import { Engine } from './engine.js';
import { Phi2Error } from './errors.js';

/**
 * @typedef {import('./protocol.js').WorkerRequest} WorkerRequest
 * @typedef {import('./protocol.js').WorkerReply} WorkerReply
 * @typedef {{ controller: AbortController, delivered: number, wake: () => void }} Running
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
/** @type {Map<number, Running>} Requests not yet finished, by id. */
const requests = new Map();
/** Requests run one after another; 'pull' and 'abort' act at once. */
let queue = Promise.resolve();

/** @param {WorkerReply} reply */
const post = (reply) => self.postMessage(reply);

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

/** @param {WorkerRequest} message */
async function handle(message) {
  const { id } = message;
  const request = /** @type {Running} */ (requests.get(id));
  const { signal } = request.controller;
  try {
    if (message.type === 'load') {
      if (engine) await engine.unload();
      engine = null;
      const onProgress = (/** @type {import('./index.js').LoadProgress} */ event) => post({ type: 'progress', id, event });
      engine = await Engine.load(message.url, { ...message.options, onProgress, signal });
      post({ type: 'result', id, value: engine.info });
    } else if (message.type === 'generate' || message.type === 'chat') {
      if (!engine) throw new Phi2Error('StateError', 'no model is loaded; call Phi2.load() first');
      const items = message.type === 'generate'
        ? engine.generate(message.prompt, { ...message.options, signal })
        : engine.chat(message.request, { signal });
      for (let sent = 0; ; sent++) {
        await untilPulled(request, sent);
        const next = await items.next();
        if (next.done) {
          post({ type: 'result', id, value: next.value, stats: engine.lastStats });
          break;
        }
        post({ type: 'item', id, value: next.value });
      }
    } else if (message.type === 'bench') {
      if (!engine) throw new Phi2Error('StateError', 'no model is loaded; call Phi2.load() first');
      post({ type: 'result', id, value: await engine.bench(message.options) });
    } else if (message.type === 'unload') {
      await engine?.unload();
      engine = null;
      post({ type: 'result', id, value: null });
    } else {
      throw new Phi2Error('InternalError', `unknown request "${message.type}"`);
    }
  } catch (error) {
    post({ type: 'error', id, error: Phi2Error.from(error).toJSON() });
  } finally {
    requests.delete(id);
  }
}

self.onmessage = (/** @type {MessageEvent<WorkerRequest>} */ { data }) => {
  const request = requests.get(data.id);
  if (data.type === 'abort' || data.type === 'pull') {
    // Also reaches a request still queued behind another: it then ends as soon as it starts.
    if (!request) return;
    if (data.type === 'abort') request.controller.abort(new Phi2Error('AbortError', 'aborted by the caller'));
    else request.delivered = data.delivered;
    request.wake();
    return;
  }
  requests.set(data.id, { controller: new AbortController(), delivered: 0, wake: () => {} });
  queue = queue.then(() => handle(data));
};
