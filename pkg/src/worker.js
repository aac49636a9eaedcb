// The package's module Web Worker: hosts one Engine so that loading and generating never block
// the page. Messages (index.js is the other side):
//   page → worker  {type: 'load', id, url, options} | {type: 'generate', id, prompt, options}
//                  | {type: 'bench', id, options} | {type: 'unload', id}
//                  | {type: 'abort', id}  (ends load or generation `id`)
//   worker → page  {type: 'progress', id, event} | {type: 'token', id, value}
//                  | {type: 'result', id, value} | {type: 'error', id, error}

import { Engine } from './engine.js';
import { Phi2Error } from './errors.js';

let engine = null;
/** AbortControllers of the running load or generation, by request id. */
const running = new Map();
/** Requests run one after another; 'abort' acts at once. */
let queue = Promise.resolve();

const post = (message) => self.postMessage(message);

async function handle({ type, id, url, prompt, options }) {
  const controller = new AbortController();
  running.set(id, controller);
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
      for (;;) {
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
    running.delete(id);
  }
}

self.onmessage = ({ data }) => {
  if (data.type === 'abort') {
    running.get(data.id)?.abort(new Phi2Error('AbortError', 'aborted by the caller'));
    return;
  }
  queue = queue.then(() => handle(data));
};
