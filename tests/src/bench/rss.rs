//! Resident memory and CPU time of a process, read from `/proc/<pid>/status` and
//! `/proc/<pid>/stat` (Linux only).

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

/// The unit of `/proc/<pid>/stat` times: fixed at 100 per second by the kernel's ABI.
const USER_HZ: f64 = 100.0;

/// CPU time the process has used so far (user + system), in seconds.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path)?;
    let ticks = parse_cpu_ticks(&stat)
        .ok_or_else(|| io::Error::other(format!("{path}: no parsable utime and stime")))?;
    Ok(ticks as f64 / USER_HZ)
}

/// utime + stime: fields 14 and 15 of `/proc/<pid>/stat`, counted after the command
/// name (field 2, in parentheses, which may itself hold spaces and parentheses).
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
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
    fn parses_cpu_ticks_after_an_awkward_name() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 4 0";
        assert_eq!(parse_cpu_ticks(stat), Some(281));
        assert_eq!(parse_cpu_ticks("42 (x) S 1"), None);
    }

    #[test]
    fn reads_own_cpu_time() {
        let before = cpu_seconds(std::process::id()).unwrap();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_seconds(std::process::id()).unwrap() > before);
    }

    #[test]
    fn reads_own_rss() {
        // The two are read at different moments (and the peak is updated lazily), so
        // they are not compared.
        assert!(vm_rss_kib(std::process::id()).unwrap() > 0);
        assert!(vm_hwm_kib(std::process::id()).unwrap() > 0);
    }
}
