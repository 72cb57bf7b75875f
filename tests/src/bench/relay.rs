//! The floor of the mesh's topology: the same path as the mesh (client, two proxies,
//! server) through two plain TCP relays, separate processes with no TLS, no HTTP/2 and no
//! policy. What the ztunnels cost beyond this floor is the price of HBONE itself; what
//! the floor costs beyond direct TCP is the price of two extra processes and four extra
//! loopback hops, which no proxy can avoid.
//!
//! The first relay speaks SOCKS5 to the client, as node1's ztunnel does, so connection
//! set-up costs the same round trips on both paths.
//!
//! `mesh-bench relay [--socks] LISTEN=TARGET...` is one relay; [`RelayChain`] runs two in
//! a row.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::net::{TcpListener, TcpStream};

use mesh_core::socks5::{self, Reply};

use super::process::{ChildGuard, Spawn, Stdout};

/// Listen IPs of the first and second relay.
pub const RELAY_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(127, 0, 0, 21), Ipv4Addr::new(127, 0, 0, 22)];
/// The relays' ports: the first target's, the second's, ...
const FIRST_PORT: u16 = 20001;
/// Per direction, as large as the ztunnel's read chunks, so buffer size is not the
/// difference being measured.
const BUFFER: usize = 256 << 10;
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses `LISTEN=TARGET`.
pub fn parse_map(arg: &str) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let (listen, target) = arg
        .split_once('=')
        .with_context(|| format!("{arg:?}: expected LISTEN=TARGET"))?;
    Ok((
        listen
            .parse()
            .with_context(|| format!("listen address {listen:?}"))?,
        target
            .parse()
            .with_context(|| format!("target address {target:?}"))?,
    ))
}

/// Relays every connection on each listen address to its target until killed. With
/// `socks`, each client first does a SOCKS5 CONNECT (whose target is not used: the map
/// decides) and is answered once the upstream connection is made.
pub async fn serve(maps: Vec<(SocketAddr, SocketAddr)>, socks: bool) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for (listen, target) in maps {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        tasks.spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                tokio::spawn(async move {
                    if socks {
                        match socks5::handshake(&mut client).await {
                            Ok(_) => {}
                            // The readiness probe connects and leaves at once.
                            Err(e) if e.reason() == "io" => return,
                            Err(e) => return eprintln!("relay: SOCKS5 handshake: {e}"),
                        }
                    }
                    let upstream = TcpStream::connect(target).await;
                    if socks {
                        let (outcome, bound) = match &upstream {
                            Ok(up) => (Reply::Succeeded, up.local_addr()),
                            Err(_) => (Reply::ConnectionRefused, client.local_addr()),
                        };
                        let bound = bound.unwrap_or(target);
                        if socks5::reply(&mut client, outcome, bound).await.is_err() {
                            return;
                        }
                    }
                    let mut upstream = match upstream {
                        Ok(upstream) => upstream,
                        Err(e) => return eprintln!("relay: connect to {target}: {e}"),
                    };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut client,
                        &mut upstream,
                        BUFFER,
                        BUFFER,
                    )
                    .await;
                });
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Two relay processes in a row in front of each target; stopped on drop.
#[derive(Debug)]
pub struct RelayChain {
    /// (target, where a client connects to reach it through both relays)
    entries: Vec<(SocketAddr, SocketAddr)>,
    relays: Vec<ChildGuard>,
    dir: PathBuf,
}

impl RelayChain {
    /// Starts the chain with `exe` (a `mesh-bench` binary) for each of `targets`.
    pub async fn start(exe: &Path, targets: &[SocketAddr], nofile: u64) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("mesh-bench-relay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let hop = |i: usize, port: u16| SocketAddr::from((RELAY_IPS[i], port));
        let ports: Vec<u16> = (FIRST_PORT..).take(targets.len()).collect();
        let mut relays = Vec::new();
        // The second relay first, so the first one has somewhere to connect to.
        for i in [1, 0] {
            let maps: Vec<String> = targets
                .iter()
                .zip(&ports)
                .map(|(target, &port)| {
                    let next = if i == 1 { *target } else { hop(1, port) };
                    format!("{}={next}", hop(i, port))
                })
                .collect();
            let mut args = vec!["relay".to_owned()];
            if i == 0 {
                args.push("--socks".to_owned());
            }
            args.extend(maps);
            let relay = ChildGuard::spawn(&Spawn {
                name: format!("relay {}", i + 1),
                program: exe.to_owned(),
                args,
                env: Vec::new(),
                stdout: Stdout::Discard,
                stderr: dir.join(format!("relay{}.stderr", i + 1)),
                nofile,
            })
            .with_context(|| format!("starting relay {} ({})", i + 1, exe.display()))?;
            relays.push(relay);
            for &port in &ports {
                wait_listening(hop(i, port), relays.last_mut().expect("just pushed")).await?;
            }
        }
        Ok(Self {
            entries: targets
                .iter()
                .zip(&ports)
                .map(|(target, &port)| (*target, hop(0, port)))
                .collect(),
            relays,
            dir,
        })
    }

    /// Each relay's state and last words, for error messages.
    pub fn diagnostics(&mut self) -> String {
        self.relays
            .iter_mut()
            .map(|r| r.describe(10))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The first relay's address that leads to `target`.
    pub fn entry_for(&self, target: SocketAddr) -> Option<SocketAddr> {
        self.entries
            .iter()
            .find_map(|(t, entry)| (*t == target).then_some(*entry))
    }
}

impl Drop for RelayChain {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `addr` accepts; the probe connection is closed at once.
async fn wait_listening(addr: SocketAddr, relay: &mut ChildGuard) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if relay.exited().is_some() || start.elapsed() > READY_TIMEOUT {
            bail!("relay not listening on {addr}: {}", relay.describe(20));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_parse_and_bad_ones_are_named() {
        let (l, t) = parse_map("127.0.0.21:20001=127.0.2.10:8080").unwrap();
        assert_eq!(l, "127.0.0.21:20001".parse().unwrap());
        assert_eq!(t, "127.0.2.10:8080".parse().unwrap());
        let err = parse_map("127.0.0.21:20001").unwrap_err().to_string();
        assert!(err.contains("LISTEN=TARGET"), "{err}");
        assert!(parse_map("x=127.0.2.10:8080").is_err());
    }
}
