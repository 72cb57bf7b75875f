//! The HTTP server behind `mesh-bench l7`: answers every request with the same 1 KiB body,
//! over HTTP/1.1 (keep-alive) or HTTP/2 cleartext, chosen per connection by hyper's
//! protocol detection. It runs as tasks on a runtime inside the server pod's namespace.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Size of every response body.
pub const RESPONSE_BYTES: usize = 1024;

/// Stops serving when dropped.
#[derive(Debug)]
pub struct HttpServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HttpServer {
    pub async fn start(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let body = Bytes::from(vec![b'x'; RESPONSE_BYTES]);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let body = body.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(body))) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Ok(HttpServer { addr, task })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
