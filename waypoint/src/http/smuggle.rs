//! Request-smuggling guard for HTTP/1.1 downstreams. hyper reads a request carrying both
//! `Content-Length` and `Transfer-Encoding` as chunked and drops `Content-Length` before
//! the engine sees it; we want such a request refused with 400, as the RFC recommends.
//! So this wrapper follows the byte stream's message framing (heads, fixed and chunked
//! bodies) and notes the index of the first request with both headers. It only reads
//! copies of what `detect::Inbound` hands hyper; hyper still parses everything.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// 1-based index of the first conflicting request on the connection; 0 = none yet.
#[derive(Clone, Default)]
pub struct Flag(Arc<AtomicUsize>);

impl Flag {
    pub fn is(&self, index: usize) -> bool {
        self.0.load(Ordering::Acquire) == index
    }
}

enum State {
    Head(Vec<u8>),
    Fixed(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    /// Trailer lines after the last chunk; `Vec` holds the current line.
    Trailers(Vec<u8>),
    /// Framing no longer followed (upgrade, a conflict found, or an oversized head).
    Done,
}

/// Follows one connection's request framing; fed every byte read from the client.
pub struct Scanner {
    state: State,
    heads: usize,
    max_head: usize,
    flag: Flag,
}

impl Scanner {
    pub fn new(max_head: usize, flag: Flag) -> Self {
        Scanner {
            state: State::Head(Vec::new()),
            heads: 0,
            max_head,
            flag,
        }
    }

    pub fn scan(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (used, next) = self.step(bytes);
            bytes = &bytes[used..];
            if let Some(next) = next {
                self.state = next;
            }
        }
    }

    /// Consumes a prefix of `bytes`; returns how much and the next state, if it changes.
    fn step(&mut self, bytes: &[u8]) -> (usize, Option<State>) {
        match &mut self.state {
            State::Done => (bytes.len(), None),
            State::Fixed(n) => {
                let (used, done) = skip(n, bytes.len());
                (used, done.then(|| State::Head(Vec::new())))
            }
            // The chunk's trailing CRLF reads as an empty size line.
            State::ChunkData(n) => {
                let (used, done) = skip(n, bytes.len());
                (used, done.then(|| State::ChunkSize(Vec::new())))
            }
            State::Head(buf) => {
                let (used, line_end) = take_until(bytes, buf, b"\r\n\r\n");
                if buf.len() > self.max_head {
                    return (used, Some(State::Done));
                }
                if !line_end {
                    return (used, None);
                }
                let head = std::mem::take(buf);
                self.heads += 1;
                (used, Some(self.after_head(&head)))
            }
            State::ChunkSize(buf) => {
                let (used, line_end) = take_until(bytes, buf, b"\n");
                if !line_end {
                    let runaway = buf.len() > 1024;
                    return (used, runaway.then_some(State::Done));
                }
                let line = String::from_utf8_lossy(buf).trim().to_owned();
                buf.clear();
                if line.is_empty() {
                    return (used, None);
                }
                let hex = line.split(';').next().unwrap_or_default().trim();
                let next = match u64::from_str_radix(hex, 16) {
                    Ok(0) => State::Trailers(Vec::new()),
                    Ok(n) => State::ChunkData(n),
                    Err(_) => State::Done,
                };
                (used, Some(next))
            }
            State::Trailers(buf) => {
                let (used, line_end) = take_until(bytes, buf, b"\n");
                if !line_end {
                    return (used, None);
                }
                let blank = buf.trim_ascii().is_empty();
                buf.clear();
                (used, blank.then(|| State::Head(Vec::new())))
            }
        }
    }

    fn after_head(&self, head: &[u8]) -> State {
        let text = String::from_utf8_lossy(head);
        let (mut cl, mut te, mut chunked, mut upgrade) = (None, false, false, false);
        for line in text.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => cl = value.parse::<u64>().ok().or(Some(0)),
                "transfer-encoding" => {
                    te = true;
                    chunked = value.to_ascii_lowercase().ends_with("chunked");
                }
                "upgrade" => upgrade = true,
                _ => {}
            }
        }
        if te && cl.is_some() {
            self.flag.0.store(self.heads, Ordering::Release);
            return State::Done;
        }
        if upgrade || text.starts_with("CONNECT ") {
            return State::Done;
        }
        match (chunked, cl) {
            (true, _) => State::ChunkSize(Vec::new()),
            (false, Some(n)) if n > 0 => State::Fixed(n),
            _ => State::Head(Vec::new()),
        }
    }
}

/// Skips up to `n` of `len` bytes; returns how many and whether `n` is used up.
fn skip(n: &mut u64, len: usize) -> (usize, bool) {
    let used = (*n).min(len as u64);
    *n -= used;
    (used as usize, *n == 0)
}

/// Appends bytes to `buf` up to and including the end of `delim`; returns how many were
/// taken and whether `buf` now ends with `delim`.
fn take_until(bytes: &[u8], buf: &mut Vec<u8>, delim: &[u8]) -> (usize, bool) {
    for (i, b) in bytes.iter().enumerate() {
        buf.push(*b);
        if buf.ends_with(delim) {
            return (i + 1, true);
        }
    }
    (bytes.len(), false)
}
