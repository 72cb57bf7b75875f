//! The demo's destination workloads: TCP echo servers that first name themselves.
//!
//! Each connection gets a greeting line with the pod name ("echo-v1\n") and then every
//! byte back, so the client can tell who answered and that data went both ways.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Running echo servers; dropping this stops them.
pub struct EchoServers {
    _tasks: JoinSet<()>,
}

impl EchoServers {
    /// Binds every `(name, addr)` before returning, so clients never race the listeners.
    pub async fn start(servers: &[(String, SocketAddr)]) -> Result<Self> {
        let mut tasks = JoinSet::new();
        for (name, addr) in servers {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind echo server {name} on {addr}"))?;
            tasks.spawn(serve(listener, name.clone()));
        }
        Ok(EchoServers { _tasks: tasks })
    }

    /// Serves listeners already bound elsewhere (inside pods' network namespaces: a
    /// socket stays in the namespace it was made in). Call within a tokio runtime.
    pub fn serve(listeners: Vec<(String, std::net::TcpListener)>) -> Result<Self> {
        let mut tasks = JoinSet::new();
        for (name, listener) in listeners {
            listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(listener)
                .with_context(|| format!("serve echo server {name}"))?;
            tasks.spawn(serve(listener, name));
        }
        Ok(EchoServers { _tasks: tasks })
    }
}

async fn serve(listener: TcpListener, name: String) {
    let mut conns = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        while conns.try_join_next().is_some() {}
        conns.spawn(echo(stream, format!("{name}\n")));
    }
}

async fn echo(mut stream: TcpStream, greeting: String) {
    if stream.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    let (mut rx, mut tx) = stream.split();
    let _ = tokio::io::copy(&mut rx, &mut tx).await;
    let _ = tx.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn greets_then_echoes() {
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let _servers = EchoServers::start(&[("echo-v9".into(), addr)])
            .await
            .unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "echo-v9\nping");
    }
}
