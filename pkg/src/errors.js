// Typed errors that survive the worker boundary: `name` says the kind, `details` names what it
// concerns (file, chunk, tensor, field, option). The engine's Rust errors arrive with the same
// shape (see crate/src/wasm.rs).

/** Every `name` a Phi2Error can have. */
export const ERROR_NAMES = Object.freeze([
  'LoadError', // a file could not be fetched (network, HTTP status, not found)
  'IntegrityError', // a chunk's bytes differ from the manifest (size, sha256)
  'FormatError', // not a phi2-web bundle, or a malformed one
  'OptionError', // an option or prompt out of range
  'DeviceError', // the GPU failed, or the bundle exceeds its limits
  'QuotaError', // the site's storage quota has no room for the bundle (load with cache: false)
  'UnsupportedError', // no WebGPU where it was required, no Worker/Cache where asked for
  'StateError', // called in the wrong state: before load, after unload, while busy
  'AbortError', // the caller's AbortSignal fired
  'OutOfMemoryError', // wasm or GPU memory ran out
  'InternalError', // the engine crashed; reload the model
]);

export class Phi2Error extends Error {
  constructor(name, message, details = {}) {
    super(message);
    this.name = ERROR_NAMES.includes(name) ? name : 'InternalError';
    this.details = details ?? {};
  }

  /** Plain data for postMessage. */
  toJSON() {
    return { name: this.name, message: this.message, details: this.details };
  }

  /** Turns anything thrown (a wasm error, a DOMException, a plain Error) into a Phi2Error. */
  static from(error) {
    if (error instanceof Phi2Error) return error;
    const name = error?.name;
    const message = String(error?.message ?? error);
    if (ERROR_NAMES.includes(name)) return new Phi2Error(name, message, error.details);
    if (name === 'TimeoutError') return new Phi2Error('LoadError', message);
    if (name === 'QuotaExceededError') return new Phi2Error('OutOfMemoryError', message);
    if (error instanceof RangeError && /memory/i.test(message)) {
      return new Phi2Error('OutOfMemoryError', `wasm memory ran out: ${message}`);
    }
    if (typeof WebAssembly !== 'undefined' && error instanceof WebAssembly.RuntimeError) {
      return new Phi2Error(
        'InternalError',
        `the engine crashed (${message}); see the console, then load the model again`,
      );
    }
    return new Phi2Error('InternalError', message);
  }

  static fromJSON(data) {
    return new Phi2Error(data.name, data.message, data.details);
  }
}

export function abortError(signal) {
  const reason = signal?.reason;
  return new Phi2Error('AbortError', reason?.message ?? String(reason ?? 'aborted'));
}
