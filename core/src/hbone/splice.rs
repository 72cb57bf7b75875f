//! Moves bytes between a TCP socket and an HBONE stream, both ways, with half-close.
//!
//! No intermediate copy buffers: TCP reads land in a `BytesMut` whose filled part is
//! handed to HTTP/2 as is; received frames are written to TCP straight from their
//! buffers. Nothing is allocated for a connection until it has data to move.

use std::future::poll_fn;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::H2Stream;

/// Bytes asked of the allocator per read chunk; large reads keep syscalls and frames few.
const CHUNK: usize = 128 << 10;
/// Below this much spare room a new chunk is reserved.
const MIN_READ: usize = 8 << 10;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Read from TCP and sent into the stream.
    pub tcp_to_stream: u64,
    /// Received from the stream and written to TCP.
    pub stream_to_tcp: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("reading from TCP: {0}")]
    TcpRead(std::io::Error),
    #[error("writing to TCP: {0}")]
    TcpWrite(std::io::Error),
    #[error("sending on HBONE stream: {0}")]
    StreamSend(h2::Error),
    #[error("receiving on HBONE stream: {0}")]
    StreamRecv(h2::Error),
    #[error("HBONE stream closed by peer")]
    StreamClosed,
}

impl SpliceError {
    pub fn reason(&self) -> &'static str {
        match self {
            SpliceError::TcpRead(_) | SpliceError::TcpWrite(_) => "tcp_error",
            SpliceError::StreamSend(_) | SpliceError::StreamRecv(_) => "stream_reset",
            SpliceError::StreamClosed => "stream_closed",
        }
    }
}

/// Splices until both directions have ended. On error the stream is reset and the TCP
/// connection aborted (RST), so neither side mistakes a failure for a clean end.
pub async fn splice(tcp: TcpStream, stream: H2Stream) -> (Transferred, Result<(), SpliceError>) {
    let (mut r, mut w) = tcp.into_split();
    let H2Stream {
        mut send,
        mut recv,
        _guard,
    } = stream;
    let mut t = Transferred::default();
    let result = tokio::try_join!(
        tcp_to_stream(&mut r, &mut send, &mut t.tcp_to_stream),
        stream_to_tcp(&mut recv, &mut w, &mut t.stream_to_tcp),
    )
    .map(|_| ());
    if result.is_err() {
        send.send_reset(h2::Reason::CANCEL);
        if let Ok(tcp) = r.reunite(w) {
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(std::time::Duration::ZERO));
        }
    }
    (t, result)
}

async fn tcp_to_stream(
    r: &mut OwnedReadHalf,
    send: &mut h2::SendStream<Bytes>,
    total: &mut u64,
) -> Result<(), SpliceError> {
    let mut buf = BytesMut::new();
    loop {
        r.readable().await.map_err(SpliceError::TcpRead)?;
        if buf.capacity() < MIN_READ {
            buf.reserve(CHUNK);
        }
        match r.try_read_buf(&mut buf) {
            Ok(0) => {
                return send
                    .send_data(Bytes::new(), true)
                    .map_err(SpliceError::StreamSend)
            }
            Ok(n) => *total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(SpliceError::TcpRead(e)),
        }
        send_all(send, buf.split().freeze()).await?;
    }
}

/// Sends `data` within the peer's flow-control window, waiting for window as needed.
async fn send_all(send: &mut h2::SendStream<Bytes>, mut data: Bytes) -> Result<(), SpliceError> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(c)) => c,
            Some(Err(e)) => return Err(SpliceError::StreamSend(e)),
            None => return Err(SpliceError::StreamClosed),
        };
        if cap == 0 {
            continue;
        }
        let chunk = data.split_to(cap.min(data.len()));
        send.send_data(chunk, false)
            .map_err(SpliceError::StreamSend)?;
    }
    Ok(())
}

async fn stream_to_tcp(
    recv: &mut h2::RecvStream,
    w: &mut OwnedWriteHalf,
    total: &mut u64,
) -> Result<(), SpliceError> {
    loop {
        match poll_fn(|cx| recv.poll_data(cx)).await {
            None => return w.shutdown().await.map_err(SpliceError::TcpWrite),
            Some(Ok(mut data)) => {
                let n = data.len();
                w.write_all_buf(&mut data)
                    .await
                    .map_err(SpliceError::TcpWrite)?;
                *total += n as u64;
                // Window is returned only once the bytes left us: backpressure.
                let _ = recv.flow_control().release_capacity(n);
            }
            Some(Err(e)) => return Err(SpliceError::StreamRecv(e)),
        }
    }
}
