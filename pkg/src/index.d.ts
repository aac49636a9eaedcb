// Typings of the phi2-web package (ESM). See README.md for the guide.

export type Backend = 'webgpu' | 'cpu';

export type Phi2ErrorName =
  | 'LoadError'
  | 'IntegrityError'
  | 'FormatError'
  | 'OptionError'
  | 'DeviceError'
  | 'QuotaError'
  | 'UnsupportedError'
  | 'StateError'
  | 'AbortError'
  | 'OutOfMemoryError'
  | 'InternalError';

export declare const ERROR_NAMES: readonly Phi2ErrorName[];

/** Every error the package throws; `details` names the file, chunk, tensor, field or option. */
export declare class Phi2Error extends Error {
  constructor(name: Phi2ErrorName, message: string, details?: Phi2ErrorDetails);
  name: Phi2ErrorName;
  details: Phi2ErrorDetails;
  toJSON(): { name: Phi2ErrorName; message: string; details: Phi2ErrorDetails };
  static from(error: unknown): Phi2Error;
  static fromJSON(data: { name: string; message: string; details?: Phi2ErrorDetails }): Phi2Error;
}

export interface Phi2ErrorDetails {
  file?: string;
  chunk?: string;
  tensor?: string;
  field?: string;
  option?: string;
  status?: number;
  /** A shortfall's figures (QuotaError, DeviceError, OutOfMemoryError from the requirements):
   * the bytes needed, and the adapter's `limit` or the storage `available` of its `quota`. */
  bytes?: number;
  limit?: number;
  available?: number;
  quota?: number;
}

export interface LoadProgress {
  /** Where the latest bytes came from or went: 'wait' while another tab downloads the same
   * bundle (this load then takes it from the cache), 'download' and 'cache' while chunks
   * arrive, 'upload' as each chunk is verified and placed on the device, 'compile' at the end. */
  phase: 'wait' | 'download' | 'cache' | 'upload' | 'compile';
  /** Bytes of chunks received so far (never decreases; reaches `totalBytes`). */
  loadedBytes: number;
  totalBytes: number;
  /** Chunks done in this phase. */
  chunk: number;
  chunks: number;
}

export interface LoadOptions {
  onProgress?: (event: LoadProgress) => void;
  signal?: AbortSignal;
  /** Keep the bundle in Cache Storage and load it from there next time (default true). */
  cache?: boolean;
  /** Run the engine in a module Web Worker (default true). */
  worker?: boolean;
  /**
   * One engine for all of the origin's tabs (default false): the engine runs in a SharedWorker,
   * and a tab that loads the same bundle with the same options attaches to the model another
   * tab loaded (or is loading) instead of loading its own; the last tab to unload it (or to
   * close) frees it. Where there is no SharedWorker (or it has no WebGPU), the tab runs its own
   * engine and `info.warnings` says so. Without it, tabs still never download a chunk twice at
   * once: a second tab waits (progress phase 'wait') and loads from the cache.
   */
  shared?: boolean;
  /** With `shared`: what this tab's generation does while another tab's runs: 'queue'
   * (default: it waits its turn) or 'cancel' (the other ends, stop reason 'cancelled'). */
  whenBusy?: 'queue' | 'cancel';
  /** Ask the browser to keep the cache under storage pressure (`navigator.storage.persist()`,
   * default false); `info.persisted` has the answer. */
  persist?: boolean;
  /** Tokens of context, prompt and output together (default and at most the model's, 2048 for
   * Phi-2): the KV cache, most of what the model needs beside its weights, scales with it. */
  contextLength?: number;
  /**
   * Threads the CPU backend's matmul runs on (default: `navigator.hardwareConcurrency`). More
   * than one needs a cross-origin isolated page (COOP/COEP headers) and the engine in a worker
   * (the default); elsewhere it runs on one and `info.warnings` says why. WebGPU ignores it.
   */
  threads?: number;
  /** 'auto' (default): WebGPU when the browser has it, else the CPU (much slower). */
  backend?: 'auto' | Backend;
  /** Chunks downloaded in parallel (1-16, default 3). */
  concurrency?: number;
  /** Where the package's worker.js is served, when a bundler moved it. */
  workerUrl?: string | URL;
  /** Where the package's wasm/phi2_web_bg.wasm is served, when a bundler moved it. */
  wasmUrl?: string | URL;
  /** A download that receives nothing for this long is abandoned and retried (default 30000). */
  stallTimeoutMs?: number;
  /**
   * Use f16 where the GPU has shader-f16 (default false): the 4-bit matmul's products and the
   * KV cache (half its memory). Faster on some GPUs and leaner, but logits move by ~1e-2 and
   * greedy tokens can differ from the reference.
   */
  f16?: boolean;
  /**
   * GPU kernels: 'auto' (default: what the adapter offers), 'portable' (a GPU's kernels with
   * their sums in workgroup memory, no subgroups: core WebGPU only, a way around a driver with
   * subgroup bugs), or 'subgroups' (a GPU's kernels with their sums through subgroups, also on
   * a fallback adapter; needs the adapter's `subgroups` feature). Ignored on the CPU backend.
   */
  kernels?: 'auto' | 'portable' | 'subgroups';
}

export interface GenerateOptions {
  /** New tokens at most (default 256). */
  maxTokens?: number;
  /** 0 (default) is greedy decoding. */
  temperature?: number;
  topK?: number | null;
  /** In (0, 1] (default 1). */
  topP?: number;
  /** 1 (default) is none. */
  repetitionPenalty?: number;
  /** OpenAI's, in [-2, 2]: subtracted once per time a token was generated so far (default 0). */
  frequencyPenalty?: number;
  /** OpenAI's, in [-2, 2]: subtracted from every token generated so far (default 0). */
  presencePenalty?: number;
  /** Seeds sampling (random when omitted). */
  seed?: number;
  /** Strings that end generation (not included in the output). */
  stop?: string[];
  /** What the output must be; generation ends when it is complete. */
  responseFormat?: ResponseFormat;
  /** Ends generation before the next token. */
  signal?: AbortSignal;
}

/**
 * Output constrained as OpenAI's `response_format` (JSON, a JSON Schema), or to a grammar
 * (OpenAI's grammar shape from custom tools: Lark as llguidance reads it, or a regex). JSON is
 * written as `json.dumps` writes it: `", "` and `": "`, no other whitespace.
 */
export type ResponseFormat =
  | { type: 'text' }
  | { type: 'json_object' }
  | { type: 'json_schema'; json_schema: { name?: string; description?: string; schema: object; strict?: boolean } }
  | { type: 'grammar'; grammar: { syntax: 'lark' | 'regex'; definition: string } };

/** A chat message; content is text, or text parts. */
export interface ChatMessage {
  role: 'system' | 'developer' | 'user' | 'assistant';
  content: string | Array<{ type: 'text'; text: string }>;
  name?: string;
}

/** OpenAI's chat completion request, the fields this engine reads. Others are an OptionError. */
export interface ChatCompletionRequest {
  messages: ChatMessage[];
  /** Accepted and echoed in the response (default "phi-2"). */
  model?: string;
  stream?: boolean;
  stream_options?: { include_usage?: boolean };
  max_tokens?: number;
  max_completion_tokens?: number;
  /** 0 (the default here: greedy; OpenAI's is 1). */
  temperature?: number;
  top_p?: number;
  seed?: number;
  stop?: string | string[];
  frequency_penalty?: number;
  presence_penalty?: number;
  response_format?: ResponseFormat;
  /** 1 only. */
  n?: number;
  logprobs?: false | null;
  user?: string;
  metadata?: Record<string, string>;
  signal?: AbortSignal;
}

export interface ChatCompletionUsage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  /** `cached_tokens`: prompt tokens taken from the previous turn's KV cache (not run again). */
  prompt_tokens_details: { cached_tokens: number };
}

export interface ChatCompletion {
  id: string;
  object: 'chat.completion';
  created: number;
  model: string;
  choices: Array<{
    index: 0;
    message: { role: 'assistant'; content: string; refusal: null };
    logprobs: null;
    /** 'length' when max_tokens (or the context) ran out, else 'stop'. */
    finish_reason: 'stop' | 'length';
  }>;
  usage: ChatCompletionUsage;
}

export interface ChatCompletionChunk {
  id: string;
  object: 'chat.completion.chunk';
  created: number;
  model: string;
  /** Empty in the last chunk of a stream with `stream_options.include_usage`, which has `usage`. */
  choices: Array<{
    index: 0;
    delta: { role?: 'assistant'; content?: string };
    logprobs: null;
    finish_reason: 'stop' | 'length' | null;
  }>;
  usage?: ChatCompletionUsage;
}

export interface ChatCompletions {
  create(request: ChatCompletionRequest & { stream: true }, options?: { signal?: AbortSignal }): Promise<AsyncIterable<ChatCompletionChunk>>;
  create(request: ChatCompletionRequest & { stream?: false | null }, options?: { signal?: AbortSignal }): Promise<ChatCompletion>;
  create(request: ChatCompletionRequest, options?: { signal?: AbortSignal }): Promise<ChatCompletion | AsyncIterable<ChatCompletionChunk>>;
}

export interface GeneratedToken {
  /** Text this token completes (may be empty while a character or stop string is pending). */
  text: string;
  tokenId: number;
}

export interface GenerationStats {
  promptTokens: number;
  /** Prompt tokens whose cache came from the previous generation (not run again). */
  reusedTokens: number;
  generatedTokens: number;
  timeToFirstTokenMs: number;
  prefillTokensPerS: number;
  decodeTokensPerS: number;
  stopReason: 'eos' | 'stop' | 'length' | 'cancelled' | null;
}

export interface BenchOptions {
  /** Tokens of the synthetic prompt (default 128). */
  promptTokens?: number;
  /** Greedy tokens generated (default 32). */
  genTokens?: number;
  /** MiB of the device copy the bandwidth is compared with (default 64). */
  copyMb?: number;
  /** Decode under this constraint (`<|endoftext|>` stays masked), to measure what it costs. */
  responseFormat?: ResponseFormat;
}

export interface BenchReport {
  /** The adapter and which kernels it runs (subgroups, shader-f16). */
  device: string;
  promptTokens: number;
  generatedTokens: number;
  timeToFirstTokenS: number;
  prefillTokensPerS: number;
  decodeTokensPerS: number;
  launchesPerToken: number;
  weightBytesPerToken: number;
  decodeEffectiveGbPerS: number;
  copyGbPerS: number;
  copyBytes: number;
  /** decodeEffectiveGbPerS / copyGbPerS */
  bandwidthRatio: number;
  /** prefillTokensPerS / decodeTokensPerS; null with one generated token (no decode speed). */
  prefillDecodeRatio: number | null;
  /** The prefill's linear-layer multiply-adds per second, in billions. */
  prefillGmacPerS: number;
  /**
   * Register-only f32 multiply-adds per second on the device, in billions, measured in the same
   * run: the arithmetic ceiling of an f32 prefill, as copyGbPerS is the memory one of a decode.
   * null on the CPU backend.
   */
  peakGmacPerS: number | null;
  /** Bytes the device's allocator holds after the run (null on the CPU backend). */
  deviceMemoryBytes: number | null;
  /** prefillGmacPerS / peakGmacPerS */
  prefillPeakShare: number | null;
  /** The largest prefillDecodeRatio the device allows at the measured decode speed (null without either). */
  prefillDecodeCeiling: number | null;
}

export interface ModelInfo {
  backend: Backend;
  /** The adapter, what it offers and which kernels the model runs; "cpu (burn-flex)" on the CPU. */
  device: string;
  contextLength: number;
  totalBytes: number;
  loadMs: number;
  /** Most chunk bytes held in memory at once while loading. */
  peakBufferedBytes: number;
  wasmMemoryBytes: number;
  /** Threads the CPU backend computes on (the `threads` option where the page is cross-origin
   * isolated, else 1, with the reason in `warnings`); null on WebGPU. */
  threads: number | null;
  /** What the load checked before it downloaded (see `Phi2.requirements`). */
  requirements: Requirements;
  /** Whether the browser keeps the cache under storage pressure (see the `persist` option). */
  persisted: boolean;
  /** Whether the engine is shared between tabs (the `shared` option, where it could be). */
  shared: boolean;
  /** With `shared`: whether this tab attached to a model another tab loaded or was loading. */
  attached?: boolean;
  /** E.g. chunks that could not be cached (storage full), f16 asked without shader-f16. */
  warnings: string[];
}

/** What loading a bundle needs, and whether this browser has it (`Phi2.requirements`). */
export interface Requirements {
  /** The manifest's URL. */
  url: string;
  backend: Backend;
  /** The manifest and chunks (the tokenizer, a few MB, comes on top). */
  download: { totalBytes: number; cachedBytes: number; bytesToDownload: number };
  /** The origin's storage (`navigator.storage.estimate()`); null without a cache (`cache: false`,
   * or no Cache Storage on an insecure page). */
  storage: {
    quotaBytes: number;
    usageBytes: number;
    availableBytes: number;
    /** Chromium reports usage + 10 GiB whatever the real limit (a privacy measure): then a
     * shortfall shows only when a chunk cannot be stored, and the load goes on (a warning). */
    quotaIsFixed: boolean;
    persisted: boolean;
  } | null;
  /** Device memory (on the CPU backend: wasm memory) the model needs. */
  memory: {
    weightsBytes: number;
    /** Keys and values of every layer for `contextLength` tokens. */
    kvCacheBytes: number;
    /** The largest prompt step's activations (prompts run in steps of 256 tokens) and logits. */
    activationsBytes: number;
    totalBytes: number;
    contextLength: number;
    kvCacheDtype: 'f32' | 'f16';
    /** The largest single buffer: the adapter's maxBufferSize and maxStorageBufferBindingSize
     * must allow it. */
    largestBuffer: { name: string; bytes: number };
  };
  /** The WebGPU adapter's limits and features (null on the CPU backend). */
  adapter: {
    name: string;
    maxBufferSize: number;
    maxStorageBufferBindingSize: number;
    shaderF16: boolean;
    subgroups: boolean;
    isFallbackAdapter: boolean;
  } | null;
  /** Whether a load can succeed; otherwise `reasons` are the errors it would fail with. */
  fits: boolean;
  reasons: Array<{ name: 'QuotaError' | 'DeviceError' | 'OutOfMemoryError'; message: string; details: Phi2ErrorDetails }>;
  /** What does not stop a load but matters (more memory than the device has, f16 without shader-f16). */
  warnings: string[];
}

export interface CachedBundle {
  /** The manifest's URL. */
  url: string;
  /** Bytes its files take in the cache (what deleting it frees). */
  bytes: number;
  /** Whether every file is cached (a load would fetch nothing). */
  complete: boolean;
}

/**
 * What a Phi2 drives: the engine on the calling thread (`worker: false`, engine.js) or the proxy
 * to the engine in the package's worker (worker-engine.js). Both implement it.
 */
export interface Engine {
  readonly info: ModelInfo;
  /** The figures of the last finished generation. */
  readonly lastStats: GenerationStats | undefined;
  /** One generation at a time: a new one ends the previous (whose cache serves it). */
  generate(prompt: string, options?: GenerateOptions): AsyncGenerator<GeneratedToken, GenerationStats, undefined>;
  /** A chat completion's chunks, then the completion; a generation like `generate`'s. */
  chat(request: Omit<ChatCompletionRequest, 'signal'>, options?: { signal?: AbortSignal }): AsyncGenerator<ChatCompletionChunk, ChatCompletion, undefined>;
  /** Ends the running generation, if any, before its next token. */
  stop(): void;
  bench(options?: BenchOptions): Promise<BenchReport>;
  /** Frees the model; a later call fails with a StateError. */
  unload(): Promise<void>;
}

export declare class Phi2 {
  /** Use Phi2.load(). */
  constructor();
  static load(url: string | URL, options?: LoadOptions): Promise<Phi2>;
  /** What loading the bundle needs and whether it fits here; fetches only the manifest. */
  static requirements(url: string | URL, options?: Omit<LoadOptions, 'onProgress'>): Promise<Requirements>;
  /** The bundles in the cache, with what deleting each would free. */
  static cachedBundles(): Promise<CachedBundle[]>;
  generate(prompt: string, options?: GenerateOptions): AsyncGenerator<GeneratedToken, GenerationStats, undefined>;
  /** OpenAI's chat completions (`model.chat.completions.create({ messages, stream })`). */
  readonly chat: { readonly completions: ChatCompletions };
  /** Ends the running generation before its next token. */
  stop(): void;
  unload(): Promise<void>;
  /** Measures this model on this device (like `phi2 bench`). */
  bench(options?: BenchOptions): Promise<BenchReport>;
  readonly stats: GenerationStats | undefined;
  readonly info: ModelInfo | undefined;
  readonly backend: Backend | undefined;
  static isCached(url: string | URL): Promise<boolean>;
  static deleteCache(url: string | URL): Promise<boolean>;
  static hasWebGPU(): Promise<boolean>;
}

export default Phi2;
