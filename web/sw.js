// phi2-web service worker: keeps the app shell (the page, its script, the package and its wasm)
// for offline use. Network first, so updates arrive; the cached copy only when the network fails.
//
// Model bundles are NOT handled here: the package keeps their files in its own cache
// ('phi2-web-bundles-v1'), which this worker never touches, and their requests (manifest.json,
// tokenizer.json, chunk-*.bin, …) pass through untouched so the big files are not stored twice.

const SHELL_CACHE = 'phi2-web-shell-v1';
const SHELL_PREFIX = 'phi2-web-shell-';
/** The page's own files, relative to this worker's folder ('' is the folder itself). */
const BASE_FILES = ['', 'index.html', 'app.js', 'manifest.webmanifest', 'icon.svg'];
/** The package's folder: every file in it is shell (its list is pkg/files.json). */
const PKG_DIR = 'pkg/';

/** This worker's folder: the shell's paths are relative to it. */
const BASE = new URL('./', self.location.href);
const here = (path) => new URL(path, BASE).href;

/** The package's files from pkg/files.json (written by scripts/build-pkg.sh), prefixed with pkg/. */
async function packageFiles() {
  try {
    const response = await fetch(here(`${PKG_DIR}files.json`), { cache: 'no-store' });
    if (!response.ok) throw new Error(`HTTP status ${response.status}`);
    const list = await response.json();
    if (!Array.isArray(list)) throw new Error('not a JSON array');
    return list
      .filter((file) => typeof file === 'string' && file && !file.startsWith('/') && !file.includes('..'))
      .map((file) => `${PKG_DIR}${file.replace(/^\.\//, '')}`);
  } catch (error) {
    // Without the list the shell still works online, and package files are cached as fetched.
    console.warn('phi2-web sw: pkg/files.json unavailable, precaching the page only:', error);
    return [];
  }
}

self.addEventListener('install', (event) => {
  event.waitUntil((async () => {
    const files = [...BASE_FILES, ...(await packageFiles())];
    const cache = await caches.open(SHELL_CACHE);
    await cache.addAll([...new Set(files)].map((file) => new Request(here(file), { cache: 'reload' })));
    await self.skipWaiting();
  })());
});

self.addEventListener('activate', (event) => {
  event.waitUntil((async () => {
    // Only older versions of this worker's own cache; the package's bundle cache stays.
    for (const name of await caches.keys()) {
      if (name.startsWith(SHELL_PREFIX) && name !== SHELL_CACHE) await caches.delete(name);
    }
    await self.clients.claim();
  })());
});

/** The path of `url` relative to this worker's folder, or null when it lies elsewhere. */
function relativePath(url) {
  if (url.origin !== BASE.origin || !url.pathname.startsWith(BASE.pathname)) return null;
  return url.pathname.slice(BASE.pathname.length);
}

/** Whether `url` is within the registration's scope (navigations there fall back to the page). */
function inScope(url) {
  const scope = self.registration?.scope;
  return Boolean(scope) && url.href.startsWith(scope);
}

function isShellPath(path) {
  return BASE_FILES.includes(path) || (path.startsWith(PKG_DIR) && path.length > PKG_DIR.length);
}

/**
 * The headers that make the page cross-origin isolated, which shared memory needs: the
 * package's CPU backend then runs on several threads. A page this worker serves has them from
 * its second load on (the first is served before the worker controls it), whatever the
 * server sends. Every file the page uses is same-origin or fetched with CORS, so
 * require-corp blocks nothing it needs.
 */
const ISOLATION_HEADERS = {
  'Cross-Origin-Opener-Policy': 'same-origin',
  'Cross-Origin-Embedder-Policy': 'require-corp',
};

/**
 * `response` with the isolation headers. Opaque responses cannot be rebuilt (nor need it), and
 * a redirected one would lose its final URL (a module's `import.meta.url`): both pass as they are.
 */
function isolated(response) {
  if (response.type === 'opaque' || response.type === 'opaqueredirect' || response.redirected) return response;
  const headers = new Headers(response.headers);
  for (const [name, value] of Object.entries(ISOLATION_HEADERS)) headers.set(name, value);
  return new Response(response.body, { status: response.status, statusText: response.statusText, headers });
}

/** Whether two responses are the same version of a file (so storing the new one is pointless). */
function sameVersion(cached, fresh) {
  const etag = fresh.headers.get('etag');
  if (etag && cached.headers.get('etag') === etag) return true;
  const modified = fresh.headers.get('last-modified');
  return Boolean(modified) &&
    cached.headers.get('last-modified') === modified &&
    cached.headers.get('content-length') === fresh.headers.get('content-length');
}

/** Stores a fresh copy of a shell file, unless the cache already has this version. */
async function refresh(key, copy) {
  try {
    const cache = await caches.open(SHELL_CACHE);
    const cached = await cache.match(key);
    if (cached && sameVersion(cached, copy)) {
      await copy.body?.cancel();
      return;
    }
    await cache.put(key, copy);
  } catch (error) {
    console.warn('phi2-web sw: could not update the cached shell:', error);
  }
}

async function fromCache(keys) {
  try {
    const cache = await caches.open(SHELL_CACHE);
    for (const key of keys) {
      const hit = await cache.match(key, { ignoreSearch: true });
      if (hit) return hit;
    }
  } catch {
    // no Cache Storage: nothing to fall back on
  }
  return undefined;
}

self.addEventListener('fetch', (event) => {
  const { request } = event;
  if (request.method !== 'GET') return;
  let url;
  try {
    url = new URL(request.url);
  } catch {
    return;
  }
  const path = relativePath(url);
  const shell = path !== null && isShellPath(path);
  const navigate = request.mode === 'navigate' && inScope(url);
  if (!shell && !navigate) return; // model bundles and everything else: not ours
  if (request.headers.has('range')) return; // partial content: let the network answer

  // A shell file is stored under its URL without the query; a navigation to anything else
  // falls back to the page.
  const key = shell ? here(path) : null;
  event.respondWith((async () => {
    try {
      const response = await fetch(request);
      if (key && response.ok && response.type === 'basic') {
        event.waitUntil(refresh(key, response.clone()));
      }
      return isolated(response);
    } catch (error) {
      const fallback = await fromCache(navigate ? [key ?? here('index.html'), here('index.html'), here('')] : [key]);
      if (fallback) return isolated(fallback);
      throw error;
    }
  })());
});
