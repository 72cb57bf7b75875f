//! The node's networking tools, run as child processes: `ip` (iproute2) and `iptables`.
//! Shelling out keeps the ztunnel free of a netlink stack for a handful of calls per
//! config change, and leaves every change visible as the command a person would type.

use std::collections::HashMap;
use std::net::IpAddr;
use std::process::Command;

use super::plan::{parse_default_devs, parse_links, parse_route_dev};
use super::CaptureError;

/// Runs `program args…`; stdout on success, the command and its stderr on failure.
pub fn run(program: &str, args: &[&str]) -> Result<String, CaptureError> {
    let command = || format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| CaptureError::Spawn {
            command: command(),
            source,
        })?;
    if !out.status.success() {
        return Err(CaptureError::Command {
            command: command(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip` with its arguments split on spaces.
pub fn ip(args: &str) -> Result<String, CaptureError> {
    run("ip", &args.split_whitespace().collect::<Vec<_>>())
}

/// Deletes with `del` until nothing matches (a crashed run may have added the same thing
/// more than once); bounded so a tool that "succeeds" forever cannot hang us.
pub fn delete_all(program: &str, args: &[&str]) {
    for _ in 0..32 {
        if run(program, args).is_err() {
            return;
        }
    }
}

/// The interface the node routes `ip` through (`ip -j route get`).
pub fn route_dev(ip: IpAddr) -> Result<String, CaptureError> {
    let args = ["-j", "route", "get", &ip.to_string()];
    let out = run("ip", &args)?;
    parse_route_dev(&out).map_err(|reason| CaptureError::Output {
        command: format!("ip {}", args.join(" ")),
        reason,
    })
}

/// Interface name -> index.
pub fn links() -> Result<HashMap<String, u32>, CaptureError> {
    let out = run("ip", &["-j", "link", "show"])?;
    parse_links(&out).map_err(|reason| CaptureError::Output {
        command: "ip -j link show".to_owned(),
        reason,
    })
}

/// The interfaces of the node's default route(s): its uplinks.
pub fn default_devs() -> Result<Vec<String>, CaptureError> {
    let out = run("ip", &["-j", "-4", "route", "show", "default"])?;
    parse_default_devs(&out).map_err(|reason| CaptureError::Output {
        command: "ip -j -4 route show default".to_owned(),
        reason,
    })
}

/// Reads an IPv4 sysctl under /proc/sys/net/ipv4 (`conf/all/rp_filter`).
pub fn read_sysctl(key: &str) -> Result<String, CaptureError> {
    let path = format!("/proc/sys/net/ipv4/{key}");
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| CaptureError::Sysctl {
            key: key.to_owned(),
            source,
        })
}

pub fn write_sysctl(key: &str, value: &str) -> Result<(), CaptureError> {
    let path = format!("/proc/sys/net/ipv4/{key}");
    std::fs::write(&path, value).map_err(|source| CaptureError::Sysctl {
        key: key.to_owned(),
        source,
    })
}
