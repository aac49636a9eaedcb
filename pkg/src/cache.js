// Where downloaded bundle files live between visits: Cache Storage, keyed by the file's URL.
// A chunk is stored only after the engine has verified its sha256, so the cache never holds a
// corrupt chunk. The manifest is stored as soon as it is validated, so the chunks of an
// interrupted load can be found again (to resume, or to delete them).

export const CACHE_NAME = 'phi2-web-bundles-v1';

/** The manifest's URL for a bundle URL (the folder, or the manifest itself). */
export function manifestUrl(url, base = globalThis.location?.href) {
  const resolved = new URL(url, base);
  if (!resolved.pathname.endsWith('.json')) {
    if (!resolved.pathname.endsWith('/')) resolved.pathname += '/';
    resolved.pathname += 'manifest.json';
  }
  return resolved.href;
}

export async function openCache() {
  if (typeof caches === 'undefined') return null; // e.g. an insecure (http, non-localhost) page
  try {
    return await caches.open(CACHE_NAME);
  } catch {
    return null;
  }
}

/** Every file URL of the bundle described by `manifest`, manifest first. */
export function bundleFiles(manifestHref, manifest) {
  const files = [manifest.tokenizer, ...manifest.chunks.map((c) => c.file)];
  return [manifestHref, ...files.map((file) => new URL(file, manifestHref).href)];
}

async function cachedManifest(cache, href) {
  const response = await cache.match(href);
  if (!response) return null;
  try {
    return await response.json();
  } catch {
    return null;
  }
}

/** Whether every file of the bundle at `url` is in the cache (a load would fetch nothing). */
export async function isCached(url) {
  const cache = await openCache();
  if (!cache) return false;
  const href = manifestUrl(url);
  const manifest = await cachedManifest(cache, href);
  if (!manifest) return false;
  for (const file of bundleFiles(href, manifest)) {
    if (!(await cache.match(file))) return false;
  }
  return true;
}

/**
 * Every bundle in the cache (complete or not), with the bytes its files take there.
 * @returns {Promise<Array<{ url: string, bytes: number, complete: boolean }>>}
 */
export async function cachedBundles() {
  const cache = await openCache();
  if (!cache) return [];
  const urls = (await cache.keys()).map((request) => request.url);
  const present = new Set(urls);
  const bundles = [];
  for (const url of urls.filter((u) => new URL(u).pathname.endsWith('.json'))) {
    const manifest = await cachedManifest(cache, url);
    if (manifest?.format !== 'phi2-web-bundle' || !Array.isArray(manifest.chunks)) continue;
    const [, tokenizer, ...chunks] = bundleFiles(url, manifest);
    const sizeOf = async (file) => (await (await cache.match(file))?.blob())?.size ?? 0;
    let bytes = (await sizeOf(url)) + (present.has(tokenizer) ? await sizeOf(tokenizer) : 0);
    let complete = present.has(tokenizer);
    chunks.forEach((file, index) => {
      if (present.has(file)) bytes += manifest.chunks[index].size;
      else complete = false;
    });
    bundles.push({ url, bytes, complete });
  }
  return bundles;
}

/** Removes the bundle's files from the cache; true if there was anything to remove. */
export async function deleteCache(url) {
  const cache = await openCache();
  if (!cache) return false;
  const href = manifestUrl(url);
  const manifest = await cachedManifest(cache, href);
  const files = manifest ? bundleFiles(href, manifest) : [href];
  let removed = false;
  for (const file of files.reverse()) removed = (await cache.delete(file)) || removed;
  return removed;
}
