//! A minimal HTTP/1.0 GET for the ztunnels' readiness and metrics ports.
//!
//! HTTP/1.0 so the server closes the connection and the body ends at EOF; chunked bodies
//! are still decoded in case a server answers 1.1 anyway. Not a general HTTP client.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

pub async fn get(addr: SocketAddr, path: &str) -> Result<Response> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = timeout(LIMIT, exchange)
        .await
        .map_err(|_| anyhow!("no answer within {LIMIT:?}"))?
        .with_context(|| format!("GET http://{addr}{path}"))?;
    parse(&raw).with_context(|| format!("GET http://{addr}{path}"))
}

fn parse(raw: &[u8]) -> Result<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("truncated HTTP response ({} bytes)", raw.len()))?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP status line {status_line:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(Response { status, body })
}

fn dechunk(mut rest: &str) -> Result<String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or_else(|| anyhow!("truncated chunked body"))?;
        let size = size.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).context("bad chunk size")?;
        if size == 0 {
            return Ok(body);
        }
        let Some(chunk) = after.get(..size) else {
            bail!("truncated chunk");
        };
        body.push_str(chunk);
        rest = after[size..].trim_start_matches("\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_and_plain_body() {
        let r = parse(b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nready").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ready"));
    }

    #[test]
    fn decodes_a_chunked_body() {
        let raw = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n\
                    4\r\nnot \r\n5\r\nready\r\n0\r\n\r\n";
        let r = parse(raw).unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "not ready"));
    }

    #[test]
    fn rejects_a_truncated_response() {
        assert!(parse(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
