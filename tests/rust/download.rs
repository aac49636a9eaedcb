//! `phi2 download` against a local server that fails on purpose: it recovers from 5xx, cut and
//! stalled connections and a corrupt chunk; fails at once, naming the file, on a 404; fails
//! naming the chunk and URL when a chunk stays corrupt; and resumes without fetching again the
//! chunks an earlier try verified.

mod common;

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{fixture, Scratch};

#[derive(Clone, Copy, Debug)]
enum Fault {
    Status(u16),
    /// Send the headers and this many body bytes, then close.
    DropAfter(usize),
    /// Send the headers and this many body bytes, then nothing for 3 s.
    StallAfter(usize),
    /// Flip the bits of this body byte.
    Corrupt(usize),
}

#[derive(Default)]
struct Shared {
    /// File name → faults for its next requests, in order.
    plan: HashMap<String, VecDeque<Fault>>,
    /// Every request's file name.
    requests: Vec<String>,
}

struct FaultServer {
    url: String,
    shared: Arc<Mutex<Shared>>,
}

impl FaultServer {
    /// Serves the files of `root` (no subfolders) on a free local port.
    fn start(root: PathBuf) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/bundle/", listener.local_addr().unwrap());
        let shared = Arc::new(Mutex::new(Shared::default()));
        let state = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (root, state) = (root.clone(), state.clone());
                std::thread::spawn(move || serve(stream, &root, &state));
            }
        });
        FaultServer { url, shared }
    }

    fn plan(&self, file: &str, faults: &[Fault]) {
        let mut shared = self.shared.lock().unwrap();
        shared
            .plan
            .insert(file.into(), faults.iter().copied().collect());
    }

    fn requests_of(&self, file: &str) -> usize {
        let shared = self.shared.lock().unwrap();
        shared.requests.iter().filter(|r| *r == file).count()
    }

    fn reset(&self) {
        *self.shared.lock().unwrap() = Shared::default();
    }
}

fn serve(mut stream: TcpStream, root: &Path, state: &Mutex<Shared>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    loop {
        let mut header = String::new();
        match reader.read_line(&mut header) {
            Ok(n) if n > 2 => continue,
            _ => break,
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/");
    let file = path
        .strip_prefix("/bundle/")
        .filter(|f| !f.contains('/'))
        .unwrap_or("")
        .to_string();
    let fault = {
        let mut shared = state.lock().unwrap();
        shared.requests.push(file.clone());
        shared.plan.get_mut(&file).and_then(VecDeque::pop_front)
    };
    let body = (!file.is_empty())
        .then(|| std::fs::read(root.join(&file)).ok())
        .flatten();
    let Some(mut body) = body else {
        let _ = stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    if let Some(Fault::Status(status)) = fault {
        let _ = write!(
            stream,
            "HTTP/1.1 {status} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return;
    }
    if let Some(Fault::Corrupt(at)) = fault {
        let at = at % body.len();
        body[at] ^= 0xff;
    }
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    match fault {
        Some(Fault::DropAfter(n)) => {
            let _ = stream.write_all(&body[..n.min(body.len())]);
        }
        Some(Fault::StallAfter(n)) => {
            let _ = stream.write_all(&body[..n.min(body.len())]);
            let _ = stream.flush();
            std::thread::sleep(Duration::from_secs(3));
        }
        _ => {
            let _ = stream.write_all(&body);
        }
    }
}

/// The tiny model converted into a bundle of 512 KiB chunks (three or more).
fn bundle(scratch: &Scratch) -> PathBuf {
    let dir = scratch.join("source");
    phi2_web::weights::convert::convert_hf(&fixture("phi-tok"), &dir, 1 << 19, |_, _| {}).unwrap();
    let chunks = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("chunk-")
        })
        .count();
    assert!(chunks >= 3, "{chunks} chunks");
    dir
}

fn download(url: &str, out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phi2"))
        .args([
            "download",
            "--url",
            url,
            // Long enough that a busy machine does not look stalled; the stall fault lasts 3 s.
            "--stall-timeout-ms",
            "1500",
            "--out",
        ])
        .arg(out)
        .output()
        .unwrap()
}

fn assert_same_files(a: &Path, b: &Path) {
    let mut names: Vec<_> = std::fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for name in &names {
        assert_eq!(
            std::fs::read(a.join(name)).unwrap(),
            std::fs::read(b.join(name)).unwrap(),
            "{name:?}"
        );
    }
    assert_eq!(std::fs::read_dir(b).unwrap().count(), names.len());
}

#[test]
fn download_recovers_from_transient_faults() {
    let scratch = Scratch::new("download-recovers");
    let source = bundle(&scratch);
    let server = FaultServer::start(source.clone());
    server.plan("manifest.json", &[Fault::Status(503)]);
    server.plan(
        "chunk-00000.bin",
        &[Fault::DropAfter(1000), Fault::Status(500)],
    );
    server.plan("chunk-00001.bin", &[Fault::Corrupt(12345)]);
    server.plan("chunk-00002.bin", &[Fault::StallAfter(100)]);
    let out = scratch.join("out");
    let output = download(&server.url, &out);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_same_files(&source, &out);
    assert!(!scratch.join("out.partial").exists());
    for (file, requests) in [
        ("manifest.json", 2),
        ("chunk-00000.bin", 3),
        ("chunk-00001.bin", 2),
        ("chunk-00002.bin", 2),
    ] {
        assert_eq!(server.requests_of(file), requests, "{file}");
    }
}

#[test]
fn download_fails_clearly_and_resumes() {
    let scratch = Scratch::new("download-resumes");
    let source = bundle(&scratch);
    let server = FaultServer::start(source.clone());
    let out = scratch.join("out");

    // A 404 fails at once, naming the file; what was verified is kept.
    server.plan("chunk-00002.bin", &[Fault::Status(404)]);
    let output = download(&server.url, &out);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("chunk-00002.bin") && stderr.contains("404"),
        "{stderr}"
    );
    assert_eq!(
        server.requests_of("chunk-00002.bin"),
        1,
        "a 404 is not retried"
    );
    assert!(!out.exists(), "a failed download must not look complete");

    // A chunk that stays corrupt fails naming the chunk and its URL.
    server.reset();
    server.plan("chunk-00002.bin", &[Fault::Corrupt(7), Fault::Corrupt(8)]);
    let output = download(&server.url, &out);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{}chunk-00002.bin", server.url)) && stderr.contains("sha256"),
        "{stderr}"
    );
    assert_eq!(
        server.requests_of("chunk-00000.bin"),
        0,
        "verified chunks are kept"
    );
    assert!(!out.exists());

    // Without faults it resumes: only the missing chunks are fetched.
    server.reset();
    let output = download(&server.url, &out);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(server.requests_of("chunk-00000.bin"), 0);
    assert_eq!(server.requests_of("chunk-00001.bin"), 0);
    assert_eq!(server.requests_of("chunk-00002.bin"), 1);
    assert_same_files(&source, &out);

    // A missing bundle says so.
    let output = download(&format!("{}missing/", server.url), &scratch.join("other"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no phi2-web bundle here"), "{stderr}");
}
