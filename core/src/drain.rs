//! The one drain primitive of the mesh: stop accepting, let work finish up to a deadline,
//! then force whatever is left to close.
//!
//! Every listener and connection task holds a `Drain`. The trigger knows the work is over
//! when every `Drain` clone has been dropped.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::warn;

/// Pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Running,
    Draining,
    Forced,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every task finished before the deadline.
    Graceful,
    /// The deadline passed; remaining tasks were told to close now.
    Forced,
}

/// Held by tasks: tells them when to stop accepting and when to close at once.
#[derive(Clone, Debug)]
pub struct Drain {
    rx: watch::Receiver<Phase>,
}

/// Held by the owner of the tasks; starts the drain.
#[derive(Debug)]
pub struct DrainTrigger {
    tx: watch::Sender<Phase>,
}

pub fn new() -> (DrainTrigger, Drain) {
    let (tx, rx) = watch::channel(Phase::Running);
    (DrainTrigger { tx }, Drain { rx })
}

impl Drain {
    /// Resolves once draining has started (stop accepting, send GOAWAY).
    pub async fn signaled(&self) {
        self.reached(Phase::Draining).await
    }

    /// Resolves once the deadline has passed (close now).
    pub async fn forced(&self) {
        self.reached(Phase::Forced).await
    }

    pub fn is_draining(&self) -> bool {
        *self.rx.borrow() >= Phase::Draining
    }

    /// The next connection on `listener`, or None once draining has started. Accept
    /// errors (out of descriptors and the like) are logged under `name` and retried after
    /// a short pause instead of spinning.
    pub async fn accept(
        &self,
        listener: &TcpListener,
        name: &str,
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            tokio::select! {
                _ = self.signaled() => return None,
                r = listener.accept() => match r {
                    Ok(accepted) => return Some(accepted),
                    Err(e) => {
                        warn!(listener = name, "accept: {e}");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
            }
        }
    }

    async fn reached(&self, phase: Phase) {
        let mut rx = self.rx.clone();
        // An error means the trigger is gone: treat as forced so nothing waits forever.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }
}

impl DrainTrigger {
    /// Starts draining and waits for every `Drain` to be dropped, up to `deadline`; after
    /// it, forces the rest and gives them `grace` to go.
    pub async fn drain(self, deadline: Duration, grace: Duration) -> DrainOutcome {
        self.tx.send_replace(Phase::Draining);
        if tokio::time::timeout(deadline, self.tx.closed())
            .await
            .is_ok()
        {
            return DrainOutcome::Graceful;
        }
        self.tx.send_replace(Phase::Forced);
        let _ = tokio::time::timeout(grace, self.tx.closed()).await;
        DrainOutcome::Forced
    }
}

/// Resolves on SIGTERM or Ctrl-C: when a proxy binary should drain and exit.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn graceful_when_tasks_finish() {
        let (trigger, drain) = new();
        let task = tokio::spawn(async move {
            drain.signaled().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(drain);
        });
        let out = trigger
            .drain(Duration::from_secs(5), Duration::from_secs(1))
            .await;
        assert_eq!(out, DrainOutcome::Graceful);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn forced_after_deadline() {
        let (trigger, drain) = new();
        let stubborn = drain.clone();
        let task = tokio::spawn(async move {
            // Ignores the drain signal; leaves only when forced.
            stubborn.forced().await;
        });
        drop(drain);
        let started = std::time::Instant::now();
        let out = trigger
            .drain(Duration::from_millis(100), Duration::from_secs(1))
            .await;
        assert_eq!(out, DrainOutcome::Forced);
        assert!(started.elapsed() >= Duration::from_millis(100));
        task.await.unwrap();
    }

    #[tokio::test]
    async fn accept_returns_connections_until_draining() {
        let (trigger, drain) = new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (_, peer) = drain.accept(&listener, "test").await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let accepting = tokio::spawn(async move { drain.accept(&listener, "test").await });
        trigger
            .drain(Duration::from_secs(5), Duration::from_secs(1))
            .await;
        assert!(accepting.await.unwrap().is_none());
    }
}
