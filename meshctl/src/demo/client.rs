//! One client connection, and what the client saw: through a ztunnel's SOCKS5 port (the
//! loopback demo), or straight to the destination from a socket made in the client pod's
//! network namespace, which the node's ztunnel captures (the network-namespace demo).
//!
//! The client speaks to the demo's echo servers: it reads the greeting naming the pod,
//! sends a line, expects it back, then half-closes and drains so the ztunnels see a clean
//! end and write their access logs. It must not consult the logs: that is the join's job.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mesh_core::socks5::{self, ConnectError};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// The client's view of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The greeting arrived and the payload came back intact.
    Echoed,
    /// The proxy answered the CONNECT with a failure code.
    Refused(u8),
    /// The connection ended before a single byte of the server arrived.
    ClosedWithoutData,
    /// Data arrived but not the payload that was sent.
    Mismatch,
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Seen {
    /// The client's address as the proxy sees it.
    pub local: Option<SocketAddr>,
    pub outcome: Outcome,
    /// Who answered: the greeting line without its newline.
    pub greeting: Option<String>,
    pub sent: usize,
    pub received: usize,
}

impl Outcome {
    /// Whether the client got nothing at all from the destination.
    pub fn blocked(&self) -> bool {
        matches!(self, Outcome::Refused(_) | Outcome::ClosedWithoutData)
    }
}

/// Connects from `from` through `proxy` to `target`, then exchanges `payload`.
pub async fn run(proxy: SocketAddr, from: IpAddr, target: SocketAddr, payload: &str) -> Seen {
    let mut seen = Seen::not_started();
    // Dialed apart from the handshake so the local address, which the access logs are
    // joined on, is known even when the proxy refuses.
    let mut stream = match timeout(DIAL_TIMEOUT, socks5::dial(from, proxy)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return seen.failed(e.to_string()),
        Err(_) => return seen.failed(format!("connect to SOCKS5 proxy {proxy}: timed out")),
    };
    seen.local = stream.local_addr().ok();
    match timeout(STEP_TIMEOUT, socks5::client_handshake(&mut stream, target)).await {
        Ok(Ok(())) => return connected(stream, payload, seen).await,
        Ok(Err(ConnectError::Refused { code })) => seen.outcome = Outcome::Refused(code),
        Ok(Err(ConnectError::Closed { .. })) => seen.outcome = Outcome::ClosedWithoutData,
        Ok(Err(e)) => return seen.failed(e.to_string()),
        Err(_) => return seen.failed("SOCKS5 reply timed out".into()),
    }
    seen
}

/// Connects `socket` (made in the client's own network namespace) to `target` as an
/// unmodified client does, then exchanges `payload`: no proxy in sight.
pub async fn direct(socket: TcpSocket, target: SocketAddr, payload: &str) -> Seen {
    let seen = Seen::not_started();
    let stream = match timeout(DIAL_TIMEOUT, socket.connect(target)).await {
        Ok(Ok(stream)) => stream,
        // A reset answering the SYN: nothing of the destination arrived either.
        Ok(Err(e))
            if socks5::is_closed(&e) || e.kind() == std::io::ErrorKind::ConnectionRefused =>
        {
            let mut seen = seen;
            seen.outcome = Outcome::ClosedWithoutData;
            return seen;
        }
        Ok(Err(e)) => return seen.failed(format!("connect to {target}: {e}")),
        Err(_) => return seen.failed(format!("connect to {target}: timed out")),
    };
    connected(stream, payload, seen).await
}

/// What the client saw when its socket could not even be made.
pub fn not_opened(client: &str, e: &std::io::Error) -> Seen {
    Seen::not_started().failed(format!(
        "open a socket in {client}'s network namespace: {e}"
    ))
}

/// One line for the progress output.
pub fn describe(seen: &Seen) -> String {
    let who = seen.greeting.as_deref().unwrap_or("?");
    match &seen.outcome {
        Outcome::Echoed => format!("{who} answered and echoed {} bytes", seen.sent),
        Outcome::Refused(code) => {
            format!(
                "refused, SOCKS5 reply {code:#04x} ({})",
                socks5::reply_name(*code)
            )
        }
        Outcome::ClosedWithoutData => "closed before any data arrived".into(),
        Outcome::Mismatch => format!("{who} answered but the echo came back different"),
        Outcome::Failed(why) => format!("failed: {why}"),
    }
}

async fn connected(stream: TcpStream, payload: &str, mut seen: Seen) -> Seen {
    seen.local = stream.local_addr().ok();
    exchange(stream, payload, &mut seen).await;
    seen
}

impl Seen {
    fn not_started() -> Seen {
        Seen {
            local: None,
            outcome: Outcome::Failed("not started".into()),
            greeting: None,
            sent: 0,
            received: 0,
        }
    }

    fn failed(mut self, why: String) -> Seen {
        self.outcome = Outcome::Failed(why);
        self
    }
}

async fn exchange(stream: TcpStream, payload: &str, seen: &mut Seen) {
    let mut stream = BufReader::new(stream);
    match read_greeting(&mut stream).await {
        Ok(greeting) => {
            seen.received = greeting.len();
            seen.greeting = Some(greeting.trim_end().to_owned());
        }
        Err(outcome) => {
            seen.outcome = outcome;
            return;
        }
    }
    seen.outcome = match timeout(STEP_TIMEOUT, echo(&mut stream, payload, seen)).await {
        Ok(Ok(true)) => Outcome::Echoed,
        Ok(Ok(false)) => Outcome::Mismatch,
        Ok(Err(e)) => Outcome::Failed(format!("echo: {e}")),
        Err(_) => Outcome::Failed("echo timed out".into()),
    };
    let _ = timeout(STEP_TIMEOUT, drain(&mut stream, seen)).await;
}

async fn read_greeting(stream: &mut BufReader<TcpStream>) -> Result<String, Outcome> {
    let mut greeting = String::new();
    match timeout(STEP_TIMEOUT, stream.read_line(&mut greeting)).await {
        Ok(Ok(0)) => Err(Outcome::ClosedWithoutData),
        Ok(Ok(_)) => Ok(greeting),
        Ok(Err(e)) if socks5::is_closed(&e) => Err(Outcome::ClosedWithoutData),
        Ok(Err(e)) => Err(Outcome::Failed(format!("read greeting: {e}"))),
        Err(_) => Err(Outcome::Failed(format!(
            "no greeting within {STEP_TIMEOUT:?}"
        ))),
    }
}

async fn echo(
    stream: &mut BufReader<TcpStream>,
    payload: &str,
    seen: &mut Seen,
) -> std::io::Result<bool> {
    stream.write_all(payload.as_bytes()).await?;
    seen.sent += payload.len();
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await?;
    seen.received += back.len();
    Ok(back == payload.as_bytes())
}

/// Half-closes and reads until the server side closes too.
async fn drain(stream: &mut BufReader<TcpStream>, seen: &mut Seen) -> std::io::Result<()> {
    stream.shutdown().await?;
    let mut rest = Vec::new();
    let n = stream.read_to_end(&mut rest).await?;
    seen.received += n;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_and_silent_close_both_count_as_blocked() {
        assert!(Outcome::Refused(2).blocked());
        assert!(Outcome::ClosedWithoutData.blocked());
        assert!(!Outcome::Echoed.blocked());
        assert!(!Outcome::Failed("x".into()).blocked());
    }
}
