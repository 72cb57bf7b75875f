//! Resident memory of a process, read from `/proc/<pid>/status` (Linux only).

use std::io;

/// Current resident set size (VmRSS) in KiB.
pub fn vm_rss_kib(pid: u32) -> io::Result<u64> {
    status_kib(pid, "VmRSS")
}

/// Peak resident set size (VmHWM) in KiB.
pub fn vm_hwm_kib(pid: u32) -> io::Result<u64> {
    status_kib(pid, "VmHWM")
}

pub fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn status_kib(pid: u32, field: &str) -> io::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path)?;
    parse_field(&status, field)
        .ok_or_else(|| io::Error::other(format!("{path}: no parsable {field} line")))
}

/// Finds `Field:   1234 kB` and returns 1234.
fn parse_field(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let value = rest.trim().strip_suffix("kB")?;
        value.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        let status = "Name:\tztunnel\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_field(status, "VmRSS"), Some(10240));
        assert_eq!(parse_field(status, "VmHWM"), Some(20480));
        assert_eq!(parse_field(status, "VmSwap"), None);
    }

    #[test]
    fn reads_own_rss() {
        // The two are read at different moments (and the peak is updated lazily), so
        // they are not compared.
        assert!(vm_rss_kib(std::process::id()).unwrap() > 0);
        assert!(vm_hwm_kib(std::process::id()).unwrap() > 0);
    }
}
