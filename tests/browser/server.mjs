// Tiny static file server for the browser tests (node:http only, no dependencies).
//
//   import { startServer } from './server.mjs';
//   const srv = await startServer({ root: '/path/to/repo' });
//   srv.url          // 'http://127.0.0.1:PORT/' (always ends in '/')
//   srv.requests     // log: [{ method, path, status, bytes, range }] in arrival order
//   await srv.close();
//
// Fault injection (tests/browser/faults.test.mjs): `startServer({ root, fault })` calls
// `fault(path)` for each file request; it returns nothing (serve normally) or one of
//   { status: 503 }        answer with that status instead
//   { dropAfter: n }       send the headers and n bytes of the body, then cut the connection
//   { stallAfter: n }      send the headers and n bytes of the body, then nothing (the
//                          connection stays open until the client gives up, at most 2 min)
//   { corruptAt: i }       flip the bits of byte i of the body
//   { delayMs: t }         wait t ms before answering
// `startServer({ root, headers })` adds `headers` to every file it serves (e.g. COOP/COEP, which
// make a page cross-origin isolated).
// Listens on 127.0.0.1 with an OS-chosen port. Serves files below `root` only (no directory
// listings, no escaping the root). Supports GET/HEAD and single byte-range requests
// (`Range: bytes=a-b`), which a loader may use for large safetensors files.
//
// Run by hand to poke at the page:  node tests/browser/server.mjs [root] [port]

import { createServer } from 'node:http';
import { stat } from 'node:fs/promises';
import { createReadStream } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const MIME = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json; charset=utf-8',
  '.wasm': 'application/wasm',
  '.txt': 'text/plain; charset=utf-8',
  '.md': 'text/plain; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.ico': 'image/x-icon',
  '.map': 'application/json; charset=utf-8',
  '.webmanifest': 'application/manifest+json',
};

export function mimeType(file) {
  return MIME[path.extname(file).toLowerCase()] ?? 'application/octet-stream';
}

function parseRange(header, size) {
  // Only a single range is supported: "bytes=start-end", "bytes=start-", "bytes=-suffix".
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === '' && m[2] === '')) return null;
  let start, end;
  if (m[1] === '') {
    const suffix = Number(m[2]);
    start = Math.max(0, size - suffix);
    end = size - 1;
  } else {
    start = Number(m[1]);
    end = m[2] === '' ? size - 1 : Math.min(Number(m[2]), size - 1);
  }
  if (start > end || start >= size) return 'unsatisfiable';
  return { start, end };
}

/**
 * Start a static server.
 * @param {{root: string, host?: string, port?: number, quiet?: boolean}} opts
 * @returns {Promise<{url: string, port: number, requests: Array<object>, close: () => Promise<void>}>}
 */
export async function startServer({ root, host = '127.0.0.1', port = 0, fault = () => undefined, headers: extraHeaders = {} } = {}) {
  if (!root) throw new Error('startServer: root is required');
  const rootAbs = path.resolve(root);
  const requests = [];

  const server = createServer(async (req, res) => {
    const entry = { method: req.method, path: req.url, status: 0, bytes: 0, range: req.headers.range ?? null };
    requests.push(entry);
    const send = (status, body, headers = {}) => {
      entry.status = status;
      const buf = Buffer.from(body);
      entry.bytes = req.method === 'HEAD' ? 0 : buf.length;
      res.writeHead(status, { 'Content-Type': 'text/plain; charset=utf-8', 'Content-Length': buf.length, ...headers });
      res.end(req.method === 'HEAD' ? undefined : buf);
    };
    try {
      if (req.method !== 'GET' && req.method !== 'HEAD') {
        return send(405, 'method not allowed\n', { Allow: 'GET, HEAD' });
      }
      let rel;
      try {
        rel = decodeURIComponent(new URL(req.url, 'http://x').pathname);
      } catch {
        return send(400, 'bad url\n');
      }
      const file = path.resolve(rootAbs, '.' + rel);
      if (file !== rootAbs && !file.startsWith(rootAbs + path.sep)) {
        return send(403, 'forbidden\n');
      }
      let st;
      try {
        st = await stat(file);
      } catch {
        return send(404, `not found: ${rel}\n`);
      }
      let target = file;
      if (st.isDirectory()) {
        if (!rel.endsWith('/')) {
          entry.status = 301;
          res.writeHead(301, { Location: rel + '/' + (new URL(req.url, 'http://x').search || '') });
          return res.end();
        }
        target = path.join(file, 'index.html');
        try {
          st = await stat(target);
        } catch {
          return send(404, `no index.html in ${rel}\n`);
        }
      }
      if (!st.isFile()) return send(404, `not a file: ${rel}\n`);

      const headers = {
        'Content-Type': mimeType(target),
        'Accept-Ranges': 'bytes',
        'Cache-Control': 'no-store',
        ...extraHeaders,
      };
      let start = 0;
      let end = st.size - 1;
      let status = 200;
      if (req.headers.range) {
        const r = parseRange(req.headers.range, st.size);
        if (r === 'unsatisfiable') {
          return send(416, 'range not satisfiable\n', { 'Content-Range': `bytes */${st.size}` });
        }
        if (r) {
          ({ start, end } = r);
          status = 206;
          headers['Content-Range'] = `bytes ${start}-${end}/${st.size}`;
        }
      }
      const injected = fault(rel) ?? {};
      entry.fault = Object.keys(injected).length ? injected : undefined;
      if (injected.delayMs) await new Promise((resolve) => setTimeout(resolve, injected.delayMs));
      if (injected.status) return send(injected.status, `injected status ${injected.status}\n`);
      const length = st.size === 0 ? 0 : end - start + 1;
      headers['Content-Length'] = length;
      entry.status = status;
      res.writeHead(status, headers);
      if (req.method === 'HEAD' || length === 0) {
        return res.end();
      }
      entry.bytes = length;
      const cutAt = injected.dropAfter ?? injected.stallAfter;
      if (cutAt !== undefined) {
        // Let the headers reach the page first: a connection that dies before them is retried
        // by the browser on its own, which would hide the fault from the loader.
        res.flushHeaders();
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
      let sent = 0;
      const stream = createReadStream(target, { start, end });
      stream.on('error', () => res.destroy());
      stream.on('data', (data) => {
        if (injected.corruptAt !== undefined && injected.corruptAt >= sent && injected.corruptAt < sent + data.length) {
          data[injected.corruptAt - sent] ^= 0xff;
        }
        if (cutAt !== undefined && sent + data.length > cutAt) {
          res.write(data.subarray(0, Math.max(0, cutAt - sent)));
          stream.destroy();
          if (injected.stallAfter === undefined) {
            res.destroy();
          } else {
            const giveUp = setTimeout(() => res.destroy(), 120_000);
            res.on('close', () => clearTimeout(giveUp));
          }
          return;
        }
        sent += data.length;
        if (!res.write(data)) {
          stream.pause();
          res.once('drain', () => stream.resume());
        }
      });
      stream.on('end', () => res.end());
    } catch (e) {
      if (!res.headersSent) send(500, `server error: ${e?.message ?? e}\n`);
      else res.destroy();
    }
  });

  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const addr = server.address();
  const url = `http://${host}:${addr.port}/`;
  return {
    url,
    port: addr.port,
    requests,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections?.();
        server.close(() => resolve());
      }),
  };
}

// `node tests/browser/server.mjs [root] [port]`: serve by hand (default root: the repo).
if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const root = process.argv[2] ?? path.resolve(here, '..', '..');
  const port = Number(process.argv[3] ?? 8000);
  const srv = await startServer({ root, port });
  console.log(`serving ${root} at ${srv.url} (web page: ${srv.url}web/)`);
}
