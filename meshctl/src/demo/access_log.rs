//! The ztunnels' JSON access logs, collected from their stdout as they are written.
//!
//! Parsed leniently as JSON values so that a renamed or added field costs a blank cell,
//! not a failed demo. Lines that are not access logs are kept apart for diagnostics.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

/// One access-log line and the node whose ztunnel wrote it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub node: &'static str,
    pub json: Value,
}

#[derive(Default)]
struct Store {
    entries: Vec<Entry>,
    other: Vec<(&'static str, String)>,
}

pub struct AccessLogs {
    store: watch::Sender<Store>,
}

impl Entry {
    pub fn str(&self, key: &str) -> Option<&str> {
        self.json
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    pub fn bool(&self, key: &str) -> Option<bool> {
        self.json.get(key).and_then(Value::as_bool)
    }

    pub fn u64(&self, key: &str) -> Option<u64> {
        self.json.get(key).and_then(Value::as_u64)
    }

    pub fn direction(&self) -> Option<&str> {
        self.str("direction")
    }

    pub fn src_addr(&self) -> Option<SocketAddr> {
        self.str("src_addr")?.parse().ok()
    }

    pub fn src_ip(&self) -> Option<IpAddr> {
        let addr = self.str("src_addr")?;
        let sock = addr.parse::<SocketAddr>().map(|a| a.ip());
        sock.or_else(|_| addr.parse()).ok()
    }

    /// The line as ztunnel wrote it (modulo key order), for diagnostics.
    pub fn raw(&self) -> String {
        self.json.to_string()
    }
}

impl AccessLogs {
    pub fn new() -> Self {
        AccessLogs {
            store: watch::Sender::new(Store::default()),
        }
    }

    /// Records one stdout line of `node`'s ztunnel.
    pub fn push_line(&self, node: &'static str, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        let json = serde_json::from_str::<Value>(line)
            .ok()
            .filter(|v| v.get("direction").is_some());
        self.store.send_modify(|store| match json {
            Some(json) => store.entries.push(Entry { node, json }),
            None => store.other.push((node, line.to_owned())),
        });
    }

    /// How many entries exist now; pass it to [`AccessLogs::wait_for`] to see only later ones.
    pub fn mark(&self) -> usize {
        self.store.borrow().entries.len()
    }

    /// The first entry after `since` matching `pred`, waiting up to `limit` for it.
    pub async fn wait_for(
        &self,
        since: usize,
        limit: Duration,
        pred: impl Fn(&Entry) -> bool,
    ) -> Option<Entry> {
        let find = |store: &Store| store.entries.iter().skip(since).find(|e| pred(e)).cloned();
        let mut rx = self.store.subscribe();
        let wait = rx.wait_for(|store| find(store).is_some());
        let store = tokio::time::timeout(limit, wait).await.ok()?.ok()?;
        find(&store)
    }

    /// The first entry after `since` matching `pred`, without waiting.
    pub fn find(&self, since: usize, pred: impl Fn(&Entry) -> bool) -> Option<Entry> {
        let store = self.store.borrow();
        store.entries.iter().skip(since).find(|e| pred(e)).cloned()
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.store.borrow().entries.clone()
    }

    /// Lines of `node`'s stdout that were not access logs.
    pub fn other_lines(&self, node: &str) -> Vec<String> {
        let store = self.store.borrow();
        let lines = store.other.iter().filter(|(n, _)| *n == node);
        lines.map(|(_, l)| l.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str =
        r#"{"direction":"inbound","src_addr":"127.0.1.10:4321","mtls":true,"bytes_sent":11}"#;

    #[tokio::test]
    async fn finds_an_entry_written_after_the_mark() {
        let logs = std::sync::Arc::new(AccessLogs::new());
        logs.push_line("node2", LINE);
        let mark = logs.mark();
        let writer = logs.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            writer.push_line("node2", "starting up");
            writer.push_line("node2", LINE);
        });
        let found = logs
            .wait_for(mark, Duration::from_secs(2), |e| {
                e.direction() == Some("inbound")
            })
            .await
            .expect("the second line");
        assert_eq!(found.src_ip(), Some("127.0.1.10".parse().unwrap()));
        assert_eq!(
            (found.bool("mtls"), found.u64("bytes_sent")),
            (Some(true), Some(11))
        );
        assert_eq!(logs.entries().len(), 2);
        assert_eq!(logs.other_lines("node2"), ["starting up"]);
    }

    #[tokio::test]
    async fn gives_up_after_the_limit() {
        let logs = AccessLogs::new();
        logs.push_line("node1", LINE);
        let found = logs
            .wait_for(logs.mark(), Duration::from_millis(20), |_| true)
            .await;
        assert!(found.is_none());
    }
}
