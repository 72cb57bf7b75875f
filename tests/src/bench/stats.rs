//! Latency samples and their percentiles.

use std::time::Duration;

/// Recorded latencies of one test; percentiles use the nearest-rank method.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    samples: Vec<Duration>,
    sorted: bool,
}

/// The figures a report shows for a set of latencies, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Latencies {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            samples: Vec::with_capacity(n),
            sorted: true,
        }
    }

    pub fn push(&mut self, sample: Duration) {
        self.samples.push(sample);
        self.sorted = false;
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The smallest sample that at least `p` percent of the samples do not exceed;
    /// `None` without samples.
    pub fn percentile(&mut self, p: f64) -> Option<Duration> {
        if self.samples.is_empty() {
            return None;
        }
        if !self.sorted {
            self.samples.sort_unstable();
            self.sorted = true;
        }
        let n = self.samples.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        Some(self.samples[rank.clamp(1, n) - 1])
    }

    pub fn summary(&mut self) -> Option<LatencySummary> {
        Some(LatencySummary {
            samples: self.samples.len(),
            p50_us: micros(self.percentile(50.0)?),
            p99_us: micros(self.percentile(99.0)?),
        })
    }
}

pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Bytes moved in `elapsed`, as Gbit/s.
pub fn gbit_per_s(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs == 0.0 {
        return 0.0;
    }
    bytes as f64 * 8.0 / secs / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut l = Latencies::with_capacity(100);
        for us in (1..=100).rev() {
            l.push(Duration::from_micros(us));
        }
        assert_eq!(l.percentile(50.0), Some(Duration::from_micros(50)));
        assert_eq!(l.percentile(99.0), Some(Duration::from_micros(99)));
        assert_eq!(l.percentile(100.0), Some(Duration::from_micros(100)));
        assert_eq!(l.percentile(0.0), Some(Duration::from_micros(1)));
        let s = l.summary().unwrap();
        assert_eq!((s.samples, s.p50_us, s.p99_us), (100, 50.0, 99.0));
    }

    #[test]
    fn single_sample_and_empty() {
        let mut l = Latencies::default();
        assert_eq!(l.summary(), None);
        l.push(Duration::from_micros(7));
        assert_eq!(l.percentile(99.0), Some(Duration::from_micros(7)));
    }

    #[test]
    fn throughput_units() {
        assert_eq!(gbit_per_s(1_000_000_000, Duration::from_secs(8)), 1.0);
        assert_eq!(gbit_per_s(5, Duration::ZERO), 0.0);
    }
}
