//! Fetching a bundle over HTTP(S) into a directory (the native CLI's `phi2 download`), with the
//! recovery the browser's loader has: each request is tried up to `attempts` times with
//! doubling pauses on network errors, stalls, 5xx, 408 and 429; other HTTP errors (404, 403)
//! fail at once; a chunk that fails its sha256 is fetched once more, then fails naming the
//! chunk and URL. Verified files stay in `<out>.partial/`, so a failed or interrupted download
//! resumes without fetching them again; the manifest is written last and the folder renamed to
//! `<out>`, so a bundle that looks complete is complete.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::bundle::{parse_manifest, verify_chunk, MANIFEST};
use crate::error::{Error, Result};

/// The largest manifest or tokenizer accepted: a server cannot make us buffer more.
const MAX_SMALL_FILE: u64 = 64 << 20;

#[derive(Debug, Clone)]
pub struct DownloadOptions {
    /// Tries per request.
    pub attempts: u32,
    /// The pause before the second try; it doubles for each later one.
    pub first_retry: Duration,
    /// A request that receives nothing for this long is abandoned (and retried).
    pub stall: Duration,
}

impl Default for DownloadOptions {
    fn default() -> Self {
        DownloadOptions {
            attempts: 4,
            first_retry: Duration::from_millis(500),
            stall: Duration::from_secs(30),
        }
    }
}

/// What a download did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub chunks: usize,
    /// Chunks already verified by an earlier, unfinished download.
    pub resumed_chunks: usize,
    pub fetched_bytes: u64,
}

struct Fetcher {
    agent: ureq::Agent,
    options: DownloadOptions,
    fetched_bytes: u64,
}

impl Fetcher {
    /// One file into memory; `expected` (a chunk's size) also caps what is read.
    fn get(&mut self, url: &str, expected: Option<u64>) -> Result<Vec<u8>> {
        let limit = expected.unwrap_or(MAX_SMALL_FILE);
        let mut last = None;
        for attempt in 0..self.options.attempts {
            if attempt > 0 {
                std::thread::sleep(self.options.first_retry * 2u32.pow(attempt - 1));
            }
            let response = match self.agent.get(url).call() {
                Ok(response) => response,
                Err(ureq::Error::Status(status, _)) => {
                    let error = Error::io(url, format!("HTTP status {status}"));
                    if status >= 500 || status == 408 || status == 429 {
                        last = Some(error);
                        continue;
                    }
                    return Err(error);
                }
                Err(ureq::Error::Transport(e)) => {
                    last = Some(Error::io(url, e));
                    continue;
                }
            };
            let mut bytes = Vec::with_capacity(limit.min(MAX_SMALL_FILE) as usize);
            let read = response
                .into_reader()
                .take(limit + 1)
                .read_to_end(&mut bytes);
            self.fetched_bytes += bytes.len() as u64;
            if let Err(e) = read {
                last = Some(Error::io(
                    url,
                    format!("the transfer failed after {} bytes: {e}", bytes.len()),
                ));
                continue;
            }
            if bytes.len() as u64 > limit {
                return Err(Error::io(
                    url,
                    format!("larger than the {limit} bytes expected"),
                ));
            }
            if let Some(size) = expected.filter(|&size| (bytes.len() as u64) < size) {
                last = Some(Error::io(
                    url,
                    format!("the connection ended after {} of {size} bytes", bytes.len()),
                ));
                continue;
            }
            return Ok(bytes);
        }
        let error = last.expect("at least one attempt");
        Err(match error {
            Error::Io { path, message } => Error::Io {
                path,
                message: format!("{message} (after {} attempts)", self.options.attempts),
            },
            other => other,
        })
    }
}

/// Writes `bytes` to `path` through a temporary file, so `path` is either absent or whole.
fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    let temporary = path.with_extension("download");
    fs::write(&temporary, bytes).map_err(|e| Error::io(temporary.display().to_string(), e))?;
    fs::rename(&temporary, path).map_err(|e| Error::io(path.display().to_string(), e))
}

/// Downloads the bundle whose folder is `base_url` into `out` (which must not exist).
/// `progress(done, total)` counts chunks.
pub fn download_bundle(
    base_url: &str,
    out: &Path,
    options: DownloadOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Downloaded> {
    if out.exists() {
        return Err(Error::io(
            out.display().to_string(),
            "already exists; remove it or choose another --out",
        ));
    }
    let base = if base_url.ends_with('/') {
        base_url.to_string()
    } else {
        format!("{base_url}/")
    };
    let url = |file: &str| format!("{base}{file}");
    let mut fetcher = Fetcher {
        agent: ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(options.stall)
            .build(),
        options,
        fetched_bytes: 0,
    };
    let manifest_url = url(MANIFEST);
    let manifest_bytes = fetcher.get(&manifest_url, None).map_err(|e| match e {
        Error::Io { message, .. } if message.starts_with("HTTP status 404") => Error::io(
            &manifest_url,
            "no phi2-web bundle here (404); make one with `phi2 convert`",
        ),
        other => other,
    })?;
    let manifest = parse_manifest(&manifest_bytes, &manifest_url)?;

    let partial = PathBuf::from(format!("{}.partial", out.display()));
    let io = |path: &Path, e: std::io::Error| Error::io(path.display().to_string(), e);
    fs::create_dir_all(&partial).map_err(|e| io(&partial, e))?;
    let tokenizer = partial.join(&manifest.tokenizer);
    if !tokenizer.exists() {
        write_whole(&tokenizer, &fetcher.get(&url(&manifest.tokenizer), None)?)?;
    }
    let mut resumed_chunks = 0;
    for (index, chunk) in manifest.chunks.iter().enumerate() {
        let path = partial.join(&chunk.file);
        let chunk_url = url(&chunk.file);
        // Kept from an earlier try only if it still verifies.
        let kept = fs::read(&path)
            .ok()
            .filter(|bytes| verify_chunk(index, chunk, bytes, None, &chunk_url).is_ok());
        if kept.is_some() {
            resumed_chunks += 1;
        } else {
            let mut bytes = fetcher.get(&chunk_url, Some(chunk.size))?;
            if verify_chunk(index, chunk, &bytes, None, &chunk_url).is_err() {
                bytes = fetcher.get(&chunk_url, Some(chunk.size))?;
                verify_chunk(index, chunk, &bytes, None, &chunk_url)?;
            }
            write_whole(&path, &bytes)?;
        }
        progress(index + 1, manifest.chunks.len());
    }
    write_whole(&partial.join(MANIFEST), &manifest_bytes)?;
    fs::rename(&partial, out).map_err(|e| io(out, e))?;
    Ok(Downloaded {
        chunks: manifest.chunks.len(),
        resumed_chunks,
        fetched_bytes: fetcher.fetched_bytes,
    })
}
