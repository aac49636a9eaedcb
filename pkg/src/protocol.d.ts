// The messages between the page's WorkerEngine (worker-engine.js) and the engine's worker
// (worker.js), dedicated or shared. Every message carries the id of the request it belongs to;
// each page numbers its own requests. The worker runs generations and benches one after
// another, every tab's (pull and abort act at once).

import type {
  BenchOptions, ChatCompletionChunk, ChatCompletionRequest, GenerateOptions, GeneratedToken, GenerationStats,
  LoadProgress, Phi2ErrorDetails, Phi2ErrorName,
} from './index.js';

/** Load options as they cross to the worker (no callback, no signal: those stay on the page). */
export interface WorkerLoadOptions {
  cache?: boolean;
  backend?: 'auto' | 'webgpu' | 'cpu';
  concurrency?: number;
  wasmUrl?: string;
  stallTimeoutMs?: number;
  f16?: boolean;
  kernels?: 'auto' | 'portable' | 'subgroups';
  contextLength?: number;
  threads?: number;
}

/** What a tab's generation does while another tab's runs on a shared engine. */
type WhenBusy = 'queue' | 'cancel';

/** Page → worker. */
export type WorkerRequest =
  | { type: 'load'; id: number; url: string; options: WorkerLoadOptions }
  | { type: 'generate'; id: number; prompt: string; options: Omit<GenerateOptions, 'signal'>; whenBusy: WhenBusy }
  | { type: 'chat'; id: number; request: Omit<ChatCompletionRequest, 'signal'>; whenBusy: WhenBusy }
  | { type: 'bench'; id: number; options: BenchOptions; whenBusy: WhenBusy }
  /** This page lets go of the model (a shared worker frees it when no page is left). */
  | { type: 'unload'; id: number }
  /** Generation `id`'s consumer has taken `delivered` items: the worker may run ahead of it. */
  | { type: 'pull'; id: number; delivered: number }
  /** Ends load or generation `id` (also while it waits its turn). */
  | { type: 'abort'; id: number };

/** Worker → page: progress and items (a generation's tokens, a chat's chunks) until one result
 * or error ends the request. */
export type WorkerReply =
  | { type: 'progress'; id: number; event: LoadProgress }
  | { type: 'item'; id: number; value: GeneratedToken | ChatCompletionChunk }
  /** `stats`: a generation's or chat's figures (a chat's value is its completion). */
  | { type: 'result'; id: number; value: unknown; stats?: GenerationStats }
  | { type: 'error'; id: number; error: SerializedError }
  /** A shared worker whose GPU device was lost closes (a new load starts a new one); id 0. */
  | { type: 'closed'; id: 0; error: SerializedError };

type SerializedError = { name: Phi2ErrorName; message: string; details: Phi2ErrorDetails };
