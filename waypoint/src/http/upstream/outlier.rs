//! Outlier detection per endpoint: consecutive 5xx or gateway errors eject it for the
//! base ejection time times the number of times it has been ejected.

use std::time::Instant;

use super::EndpointState;
use crate::config::OutlierDetection;

#[derive(Default)]
pub struct Outlier {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Outlier {
    /// `status`: the response status, `None` when no response came; `gateway`: a connect
    /// failure, reset, timeout or 502/503/504. `ejected`/`total`: the cluster's other
    /// endpoints now ejected, and its size, for the max ejection percent.
    pub fn record(
        &mut self,
        od: &OutlierDetection,
        status: Option<u16>,
        gateway: bool,
        ejected: usize,
        total: usize,
    ) {
        // Failures with no response count as 5xx, as Envoy counts locally originated ones.
        let server_error = status.is_none_or(|s| s >= 500);
        if !server_error {
            self.consecutive_5xx = 0;
            self.consecutive_gateway = 0;
            return;
        }
        self.consecutive_5xx += 1;
        self.consecutive_gateway = if gateway {
            self.consecutive_gateway + 1
        } else {
            0
        };
        let tripped = od
            .consecutive_5xx_errors
            .is_some_and(|n| self.consecutive_5xx >= n)
            || od
                .consecutive_gateway_errors
                .is_some_and(|n| self.consecutive_gateway >= n);
        let now = Instant::now();
        let already = self.ejected_until.is_some_and(|t| t > now);
        // Envoy ejects while the ejected share is below the maximum, so one endpoint can
        // always go even in a small cluster.
        let below_max = ejected * 100 < od.max_ejection_percent as usize * total;
        if tripped && !already && below_max {
            self.ejections += 1;
            self.ejected_until = Some(now + od.base_ejection_time * self.ejections);
            self.consecutive_5xx = 0;
            self.consecutive_gateway = 0;
        }
    }
}

impl EndpointState {
    pub fn ejected(&self) -> bool {
        let o = self.outlier.lock().unwrap_or_else(|e| e.into_inner());
        o.ejected_until.is_some_and(|t| t > Instant::now())
    }
}
