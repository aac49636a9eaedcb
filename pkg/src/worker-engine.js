// @ts-check
// The page's side of the engine worker (worker.js), dedicated or shared between tabs: an
// Engine (index.d.ts) whose calls become messages of the worker protocol (protocol.d.ts).

import { Phi2Error } from './errors.js';

/**
 * @typedef {import('./index.js').Engine} Engine
 * @typedef {import('./index.js').ModelInfo} ModelInfo
 * @typedef {import('./index.js').GenerationStats} GenerationStats
 * @typedef {import('./index.js').GeneratedToken} GeneratedToken
 * @typedef {import('./index.js').GenerateOptions} GenerateOptions
 * @typedef {import('./index.js').BenchOptions} BenchOptions
 * @typedef {import('./index.js').BenchReport} BenchReport
 * @typedef {import('./index.js').LoadProgress} LoadProgress
 * @typedef {import('./protocol.js').WorkerRequest} WorkerRequest
 * @typedef {import('./protocol.js').WorkerReply} WorkerReply
 * @typedef {import('./protocol.js').WorkerLoadOptions} WorkerLoadOptions
 * @typedef {import('./index.js').ChatCompletionRequest} ChatCompletionRequest
 * @typedef {import('./index.js').ChatCompletion} ChatCompletion
 * @typedef {import('./index.js').ChatCompletionChunk} ChatCompletionChunk
 */

/**
 * A request without its id (the engine numbers requests).
 * @typedef {WorkerRequest extends infer R ? (R extends { id: number } ? Omit<R, 'id'> : never) : never} Unnumbered
 */

/**
 * The engine's end of a worker: a dedicated Worker, or a SharedWorker's port.
 * @typedef {{ postMessage(message: WorkerRequest): void, close(): void,
 *   onMessage(handler: (reply: WorkerReply) => void): void, onError(handler: (message: string) => void): void }} Channel
 */

/** @param {Worker} worker @returns {Channel} */
function dedicatedChannel(worker) {
  return {
    postMessage: (message) => worker.postMessage(message),
    close: () => worker.terminate(),
    onMessage: (handler) => (worker.onmessage = ({ data }) => handler(data)),
    onError: (handler) => (worker.onerror = (event) => {
      event.preventDefault?.();
      handler(event.message ?? 'script error');
    }),
  };
}

/** @param {SharedWorker} worker @returns {Channel} */
function sharedChannel(worker) {
  return {
    postMessage: (message) => worker.port.postMessage(message),
    close: () => worker.port.close(),
    onMessage: (handler) => (worker.port.onmessage = ({ data }) => handler(data)),
    onError: (handler) => (worker.onerror = (event) => {
      event.preventDefault?.();
      handler(/** @type {ErrorEvent} */ (event).message ?? 'script error');
    }),
  };
}

/**
 * The name that makes tabs share a SharedWorker: the bundle and every option that shapes the
 * engine (two tabs asking for different ones get different engines).
 * @param {string} href
 * @param {WorkerLoadOptions} options
 */
function sharedName(href, options) {
  const { cache = true, backend = 'auto', f16 = false, kernels = 'auto', contextLength = null, wasmUrl = null, threads = null } = options;
  return `phi2-web ${JSON.stringify({ href, cache, backend, f16, kernels, contextLength, wasmUrl, threads })}`;
}

/** @implements {Engine} */
export class WorkerEngine {
  /** @type {Channel} */
  #channel;
  #nextId = 1;
  /** @type {Map<number, (reply: WorkerReply) => void>} Request id → handler of its replies. */
  #requests = new Map();
  /** @type {Phi2Error | null} */
  #broken = null;
  /** @type {(() => void) | null} Stops the running generation, if any. */
  #stopGeneration = null;
  /** @type {'queue' | 'cancel'} What this tab's generations do while another tab's runs. */
  #whenBusy;
  /** @type {ModelInfo} */
  info;
  /** @type {GenerationStats | undefined} */
  lastStats;

  /**
   * @param {Channel} channel
   * @param {'queue' | 'cancel'} whenBusy
   */
  constructor(channel, whenBusy) {
    this.#channel = channel;
    this.#whenBusy = whenBusy;
    this.info = /** @type {ModelInfo} */ ({});
    channel.onMessage((data) => {
      if (data.type === 'closed') this.#fail(Phi2Error.fromJSON(data.error));
      else this.#requests.get(data.id)?.(data);
    });
    channel.onError((message) => this.#fail(new Phi2Error('InternalError', `the engine's worker failed: ${message}`)));
  }

  /**
   * Starts the package's worker — dedicated, or with `shared` the origin's SharedWorker for
   * this bundle and these options — and loads the bundle at `href` (absolute) there.
   * @param {string} href
   * @param {WorkerLoadOptions & { onProgress?: (event: LoadProgress) => void, signal?: AbortSignal,
   *   workerUrl?: string, shared?: boolean, whenBusy?: 'queue' | 'cancel' }} options
   */
  static async load(href, { onProgress = () => {}, signal, workerUrl, shared = false, whenBusy = 'queue', ...options }) {
    const url = workerUrl ?? new URL('./worker.js', import.meta.url);
    let channel;
    try {
      channel = shared
        ? sharedChannel(new SharedWorker(url, { type: 'module', name: sharedName(href, options) }))
        : dedicatedChannel(new Worker(url, { type: 'module' }));
    } catch (error) {
      throw new Phi2Error('UnsupportedError', `cannot start the engine's module ${shared ? 'shared ' : ''}worker (${error instanceof Error ? error.message : error}); pass worker: false`);
    }
    const engine = new WorkerEngine(channel, whenBusy);
    try {
      engine.info = /** @type {ModelInfo} */ (await engine.#call({ type: 'load', url: href, options }, signal, onProgress));
    } catch (error) {
      channel.close();
      throw error;
    }
    if (shared) {
      // Leaving the page lets go of this tab's share of the model (the last tab frees it).
      const leave = (/** @type {PageTransitionEvent} */ event) => {
        if (!event.persisted) engine.unload().catch(() => {});
      };
      globalThis.addEventListener?.('pagehide', leave, { once: true });
    }
    return engine;
  }

  /** @param {Phi2Error} error */
  #fail(error) {
    this.#broken = error;
    for (const [id, handler] of this.#requests) handler({ type: 'error', id, error: error.toJSON() });
    this.#requests.clear();
  }

  /** @param {WorkerRequest} message */
  #post(message) {
    this.#channel.postMessage(message);
  }

  /**
   * Sends a request; `onReply` sees each of its replies until it returns true (the last).
   * @param {Unnumbered} message
   * @param {(reply: WorkerReply) => boolean} onReply
   * @returns {number} the request's id
   */
  #send(message, onReply) {
    if (this.#broken) throw this.#broken;
    const id = this.#nextId++;
    this.#requests.set(id, (reply) => {
      if (onReply(reply)) this.#requests.delete(id);
    });
    this.#post(/** @type {WorkerRequest} */ ({ ...message, id }));
    return id;
  }

  /**
   * A request answered by one result (progress events before it go to `onProgress`).
   * @param {Unnumbered} message
   * @param {AbortSignal} [signal]
   * @param {(event: LoadProgress) => void} [onProgress]
   * @returns {Promise<unknown>}
   */
  #call(message, signal, onProgress) {
    return new Promise((resolve, reject) => {
      const abort = () => this.#post({ type: 'abort', id });
      const id = this.#send(message, (reply) => {
        if (reply.type === 'progress') {
          onProgress?.(reply.event);
          return false;
        }
        signal?.removeEventListener('abort', abort);
        if (reply.type === 'result') resolve(reply.value);
        else if (reply.type === 'error') reject(Phi2Error.fromJSON(reply.error));
        return true;
      });
      signal?.addEventListener('abort', abort, { once: true });
      if (signal?.aborted) abort();
    });
  }

  /**
   * @param {string} prompt
   * @param {GenerateOptions} [options]
   * @returns {AsyncGenerator<GeneratedToken, GenerationStats, undefined>}
   */
  async *generate(prompt, options = {}) {
    const { signal, ...params } = options ?? {};
    const stats = yield* this.#stream({ type: 'generate', prompt, options: params, whenBusy: this.#whenBusy }, signal, true);
    return /** @type {GenerationStats} */ (stats);
  }

  /**
   * @param {ChatCompletionRequest} request without its `signal`
   * @param {{ signal?: AbortSignal }} [options]
   * @returns {AsyncGenerator<ChatCompletionChunk, ChatCompletion, undefined>}
   */
  async *chat(request, { signal } = {}) {
    return /** @type {ChatCompletion} */ (yield* this.#stream({ type: 'chat', request, whenBusy: this.#whenBusy }, signal, false));
  }

  /**
   * A generation in the worker (`message` starts it): its items arrive as the worker makes
   * them, at most a few ahead of the consumer (worker.js TOKENS_AHEAD), who takes them at its
   * own pace. Once stopped (signal, stop() or an early exit) it yields nothing more: items
   * already here are dropped, and, where each item is a token (`itemsAreTokens`), the stats
   * count only the tokens the consumer received. A running generation ends first.
   * @param {Unnumbered} message
   * @param {AbortSignal | undefined} signal
   * @param {boolean} itemsAreTokens
   * @returns {AsyncGenerator<any, unknown, undefined>}
   */
  async *#stream(message, signal, itemsAreTokens) {
    if (signal !== undefined && !(signal instanceof AbortSignal)) {
      throw new Phi2Error('OptionError', 'signal must be an AbortSignal', { option: 'signal' });
    }
    // The worker runs requests in turn, and a generation waits for its consumer to pull.
    this.stop();
    /** @type {unknown[]} */
    const arrived = [];
    /** @type {WorkerReply | null} the result or error that ended it */
    let end = null;
    /** @type {(() => void) | null} */
    let wake = null;
    const id = this.#send(message, (reply) => {
      if (reply.type === 'item') arrived.push(reply.value);
      else end = reply;
      wake?.();
      return reply.type !== 'item';
    });
    let delivered = 0;
    let stopped = false;
    const stop = () => {
      if (stopped) return;
      stopped = true;
      if (!end) this.#post({ type: 'abort', id });
      wake?.();
    };
    const untilWoken = async () => {
      await new Promise((resolve) => (wake = () => resolve(undefined)));
      wake = null;
    };
    /** @param {WorkerReply} reply */
    const finish = (reply) => {
      if (reply.type === 'error') throw Phi2Error.fromJSON(reply.error);
      if (reply.type !== 'result') return undefined;
      const stats = reply.stats;
      this.lastStats = stats && itemsAreTokens && stopped && delivered < stats.generatedTokens
        ? { ...stats, generatedTokens: delivered, stopReason: 'cancelled' }
        : stats;
      return reply.value;
    };
    this.#stopGeneration = stop;
    signal?.addEventListener('abort', stop, { once: true });
    if (signal?.aborted) stop();
    let returned = false;
    try {
      while (!end || (!stopped && arrived.length > 0)) {
        if (stopped || arrived.length === 0) {
          await untilWoken();
          continue;
        }
        delivered += 1;
        this.#post({ type: 'pull', id, delivered });
        yield arrived.shift();
      }
      returned = true;
      return finish(end);
    } finally {
      signal?.removeEventListener('abort', stop);
      if (this.#stopGeneration === stop) this.#stopGeneration = null;
      if (!returned) {
        // The consumer left early (break, or an error): the worker stops within a few items,
        // and the stats are still this generation's.
        stop();
        while (!end) await untilWoken();
        try {
          finish(end);
        } catch {
          // the consumer's own exit or error is what the caller sees
        }
      }
    }
  }

  stop() {
    this.#stopGeneration?.();
  }

  /**
   * @param {BenchOptions} [options]
   * @returns {Promise<BenchReport>}
   */
  async bench(options = {}) {
    this.stop();
    return /** @type {BenchReport} */ (await this.#call({ type: 'bench', options, whenBusy: this.#whenBusy }));
  }

  async unload() {
    if (this.#broken) return;
    this.stop();
    try {
      await this.#call({ type: 'unload' });
    } finally {
      this.#channel.close();
      this.#broken = new Phi2Error('StateError', 'the model has been unloaded; load it again');
    }
  }
}
