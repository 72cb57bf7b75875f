//! The downstream stream as hyper reads it: protocol detection for ports of unknown
//! protocol (HTTP/2 when the client opens with the connection preface, else HTTP/1.1),
//! replaying the bytes read to decide, and the smuggling scanner's view of HTTP/1.1.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::smuggle::Scanner;
use crate::backend::BoxIo;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A stream that first yields `prefix`, then the inner stream's bytes, showing all of
/// them to `scanner` when one is set.
pub struct Inbound {
    prefix: Bytes,
    io: BoxIo,
    scanner: Option<Scanner>,
}

impl Inbound {
    pub fn new(io: BoxIo) -> Inbound {
        Inbound {
            prefix: Bytes::new(),
            io,
            scanner: None,
        }
    }

    pub fn scanned(mut self, scanner: Scanner) -> Inbound {
        self.scanner = Some(scanner);
        self
    }
}

/// Reads until the bytes are the whole preface or differ from it; returns the stream
/// with those bytes put back and whether the client speaks HTTP/2.
pub async fn sniff(mut io: BoxIo) -> io::Result<(Inbound, bool)> {
    let mut buf = [0u8; PREFACE.len()];
    let mut n = 0;
    while n < PREFACE.len() {
        let read = io.read(&mut buf[n..]).await?;
        if read == 0 {
            break;
        }
        n += read;
        if buf[..n] != PREFACE[..n] {
            break;
        }
    }
    let h2 = buf[..n] == *PREFACE;
    let prefix = Bytes::copy_from_slice(&buf[..n]);
    let inbound = Inbound {
        prefix,
        io,
        scanner: None,
    };
    Ok((inbound, h2))
}

impl AsyncRead for Inbound {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = out.filled().len();
        let polled = if self.prefix.has_remaining() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            Poll::Ready(Ok(()))
        } else {
            Pin::new(&mut self.io).poll_read(cx, out)
        };
        if let (Poll::Ready(Ok(())), Some(scanner)) = (&polled, self.scanner.as_mut()) {
            scanner.scan(&out.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Inbound {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
