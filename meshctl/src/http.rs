//! The one HTTP client meshctl needs: a GET of a JSON document from a plain-HTTP
//! debug or admin endpoint (a ztunnel's `/config_dump`, the controller's `/debug/syncz`).
//! Only `http://host:port` addresses: these endpoints are never served over TLS.

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_secs(10);

/// GET `path` from `base` (`http://host:port`) and parse the body as JSON.
pub async fn get_json(base: &str, path: &str) -> anyhow::Result<Value> {
    let Some(rest) = base.strip_prefix("http://") else {
        bail!("address {base:?} must start with http://");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        bail!("address {base:?} names no host:port");
    }
    let url = format!("http://{authority}{path}");
    let body = tokio::time::timeout(TIMEOUT, get(authority, path))
        .await
        .with_context(|| format!("{url}: no answer within {TIMEOUT:?}"))?
        .with_context(|| url.clone())?;
    serde_json::from_slice(&body).with_context(|| format!("{url} is not JSON"))
}

/// A minimal HTTP/1.0 GET: the server then answers with a plain body and closes.
async fn get(authority: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(authority)
        .await
        .with_context(|| format!("connect to {authority}"))?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nAccept: application/json\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await?;
    let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!(
            "malformed HTTP response ({} bytes, no header end)",
            response.len()
        );
    };
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("server answered {status:?}");
    }
    Ok(response[split + 4..].to_vec())
}
