//! Holds `/dev/cpu_dma_latency` at 0 for the length of a measurement, so idle CPUs poll
//! instead of halting: a halted vCPU takes tens of microseconds to wake, which swamps the
//! round trips being measured. Closing the file (dropping the guard) restores the default.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

const DEVICE: &str = "/dev/cpu_dma_latency";

/// While alive, keeps the CPU idle-exit latency request at 0 us, if the device allowed it.
#[derive(Debug)]
pub struct CpuDmaLatency {
    // The kernel honours the request only while this descriptor stays open.
    held: Option<File>,
}

impl CpuDmaLatency {
    /// Requests poll mode; falls back to the default idle mode when the device is missing
    /// or not writable (it needs root). Check [`CpuDmaLatency::mode`] for the outcome.
    pub fn acquire() -> Self {
        Self {
            held: request_zero(Path::new(DEVICE)),
        }
    }

    /// Leaves the idle mode alone.
    pub fn disabled() -> Self {
        Self { held: None }
    }

    /// [`CpuDmaLatency::acquire`], or [`CpuDmaLatency::disabled`] when `no_poll` (a
    /// benchmark's `--no-poll` flag).
    pub fn unless(no_poll: bool) -> Self {
        if no_poll {
            Self::disabled()
        } else {
            Self::acquire()
        }
    }

    pub fn is_polling(&self) -> bool {
        self.held.is_some()
    }

    /// How to describe the mode in a report.
    pub fn mode(&self) -> &'static str {
        if self.is_polling() {
            "poll mode (cpu_dma_latency=0)"
        } else {
            "default idle mode"
        }
    }
}

/// The mode as the JSON summaries name it, from [`CpuDmaLatency::mode`]'s text.
pub fn json_mode(mode: &str) -> &'static str {
    if mode.starts_with("poll") {
        "poll"
    } else {
        "default"
    }
}

fn request_zero(path: &Path) -> Option<File> {
    let mut file = OpenOptions::new().write(true).open(path).ok()?;
    // The device takes a 32-bit latency in microseconds, in host byte order.
    file.write_all(&0u32.to_ne_bytes()).ok()?;
    Some(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_means_default_mode() {
        let guard = CpuDmaLatency {
            held: request_zero(Path::new("/nonexistent/cpu_dma_latency")),
        };
        assert!(!guard.is_polling());
        assert_eq!(guard.mode(), "default idle mode");
    }
}
