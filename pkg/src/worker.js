// The package's module Web Worker: hosts one Engine so that loading and generating never block
// the page. Messages (index.js is the other side):
//   page → worker  {type: 'load', id, url, options} | {type: 'generate', id, prompt, options}
//                  | {type: 'bench', id, options} | {type: 'unload', id}
//                  | {type: 'pull', id, delivered}  (generation `id`'s consumer has taken
//                    `delivered` tokens)
//                  | {type: 'abort', id}  (ends load or generation `id`)
//   worker → page  {type: 'progress', id, event} | {type: 'token', id, value}
//                  | {type: 'result', id, value} | {type: 'error', id, error}

import { Engine } from './engine.js';
import { Phi2Error } from './errors.js';

/**
 * Tokens a generation may run ahead of its consumer: enough to hide a message round trip
 * behind the next token's computation, few enough that a stop wastes little. Without a bound
 * a device faster than the round trip finished the whole budget before a stop arrived (a step
 * on the CPU backend never yields to the worker's event loop, so messages wait until it must).
 */
const TOKENS_AHEAD = 4;

let engine = null;
/** Requests not yet finished, by id: {controller, delivered, wake}. */
const requests = new Map();
/** Requests run one after another; 'pull' and 'abort' act at once. */
let queue = Promise.resolve();

const post = (message) => self.postMessage(message);

/** Resolves once the page has taken enough of the `sent` tokens, or the request is aborted. */
async function untilPulled(request, sent) {
  while (sent >= request.delivered + TOKENS_AHEAD && !request.controller.signal.aborted) {
    await new Promise((resolve) => (request.wake = resolve));
  }
}

async function handle({ type, id, url, prompt, options }) {
  const request = requests.get(id);
  const { controller } = request;
  try {
    if (type === 'load') {
      if (engine) await engine.unload();
      engine = null;
      const onProgress = (event) => post({ type: 'progress', id, event });
      engine = await Engine.load(url, { ...options, onProgress, signal: controller.signal });
      post({ type: 'result', id, value: engine.info });
    } else if (type === 'generate') {
      if (!engine) throw new Phi2Error('StateError', 'no model is loaded; call Phi2.load() first');
      const tokens = engine.generate(prompt, { ...options, signal: controller.signal });
      for (let sent = 0; ; sent++) {
        await untilPulled(request, sent);
        const { done, value } = await tokens.next();
        if (done) {
          post({ type: 'result', id, value });
          break;
        }
        post({ type: 'token', id, value });
      }
    } else if (type === 'bench') {
      if (!engine) throw new Phi2Error('StateError', 'no model is loaded; call Phi2.load() first');
      post({ type: 'result', id, value: await engine.bench(options) });
    } else if (type === 'unload') {
      await engine?.unload();
      engine = null;
      post({ type: 'result', id, value: null });
    } else {
      throw new Phi2Error('InternalError', `unknown request "${type}"`);
    }
  } catch (error) {
    post({ type: 'error', id, error: Phi2Error.from(error).toJSON() });
  } finally {
    requests.delete(id);
  }
}

self.onmessage = ({ data }) => {
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
