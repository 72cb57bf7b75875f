//! An HBONE stream as a byte stream (`AsyncRead` + `AsyncWrite`), for code that speaks a
//! protocol over a tunnel rather than splicing it to a socket (the waypoint's HTTP engine
//! and its TCP passthrough). Received frames are released to flow control as they are
//! read; a write waits for stream capacity; shutdown sends END_STREAM.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{ActiveGuard, H2Stream};

pub struct StreamIo {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    /// Received and not yet read.
    pending: Bytes,
    recv_done: bool,
    send_done: bool,
    _guard: Option<ActiveGuard>,
}

impl H2Stream {
    pub fn into_io(self) -> StreamIo {
        let H2Stream { send, recv, _guard } = self;
        StreamIo {
            send,
            recv,
            pending: Bytes::new(),
            recv_done: false,
            send_done: false,
            _guard,
        }
    }
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl StreamIo {
    /// The first bytes the peer has sent (at least one frame's worth), left to be read:
    /// lets a proxy choose how to speak before anything is consumed. Empty at the end.
    pub async fn peek(&mut self) -> io::Result<&[u8]> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await?;
        Ok(&self.pending)
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pending.is_empty() && !self.recv_done {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                // A peer that resets with NO_ERROR has finished sending.
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => self.recv_done = true,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => self.recv_done = true,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_fill(cx))?;
        let n = out.remaining().min(me.pending.len());
        out.put_slice(&me.pending[..n]);
        me.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        me.send.reserve_capacity(buf.len());
        loop {
            match ready!(me.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => {
                    let n = n.min(buf.len());
                    me.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(h2_to_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HBONE stream closed for sending",
                    )))
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.send_done {
            me.send_done = true;
            me.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for StreamIo {
    fn drop(&mut self) {
        // Dropped before a clean end: tell the peer rather than leave the stream open.
        if !self.send_done {
            self.send.send_reset(h2::Reason::CANCEL);
        }
    }
}
