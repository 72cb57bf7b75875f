//! The servers benchmarks talk to, run inside the benchmark process: a sink that counts
//! what it receives (each connection on a blocking thread of its own, as bulk transfer is
//! measured best), and an echo server (tasks on the runtime).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const SINK_BUFFER: usize = 256 << 10;
const ECHO_BUFFER: usize = 16 << 10;

/// A sink and an echo server on ephemeral ports of one IP; stopped on drop.
#[derive(Debug)]
pub struct Servers {
    /// Reads until the client half-closes, then answers with the number of bytes read as
    /// a big-endian u64 and closes: the client checks nothing was lost.
    pub sink: SocketAddr,
    /// Writes back every byte it reads, and closes when the client does.
    pub echo: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl Servers {
    pub async fn start(ip: IpAddr) -> io::Result<Self> {
        let (sink, sink_task) = serve(ip, sink).await?;
        let (echo, echo_task) = serve(ip, echo).await?;
        Ok(Self {
            sink,
            echo,
            tasks: vec![sink_task, echo_task],
        })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn serve<F, Fut>(ip: IpAddr, handler: F) -> io::Result<(SocketAddr, JoinHandle<()>)>
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = io::Result<()>> + Send + 'static,
{
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        // Accept errors (e.g. running out of descriptors) are transient; keep serving.
        loop {
            if let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(handler(tcp));
            }
        }
    });
    Ok((addr, task))
}

async fn sink(tcp: TcpStream) -> io::Result<()> {
    let mut tcp = tcp.into_std()?;
    tcp.set_nonblocking(false)?;
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; SINK_BUFFER];
        let mut total = 0u64;
        loop {
            match tcp.read(&mut buf)? {
                0 => break,
                n => total += n as u64,
            }
        }
        tcp.write_all(&total.to_be_bytes())?;
        tcp.shutdown(std::net::Shutdown::Write)
    })
    .await?
}

async fn echo(mut tcp: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; ECHO_BUFFER];
    loop {
        match tcp.read(&mut buf).await? {
            0 => return tcp.shutdown().await,
            n => tcp.write_all(&buf[..n]).await?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sink_counts_and_echo_echoes() {
        let servers = Servers::start([127, 0, 0, 1].into()).await.unwrap();

        let mut tcp = TcpStream::connect(servers.sink).await.unwrap();
        tcp.write_all(&[7u8; 100_000]).await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut count = [0u8; 8];
        tcp.read_exact(&mut count).await.unwrap();
        assert_eq!(u64::from_be_bytes(count), 100_000);

        let mut tcp = TcpStream::connect(servers.echo).await.unwrap();
        tcp.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        tcp.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
    }
}
