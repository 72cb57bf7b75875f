//! What `mesh-bench l4` prints: the table for people, then the JSON line for scripts.

use serde::Serialize;

use super::{Plan, Results};
use crate::bench::report::{fixed, round, Table};
use crate::bench::rss::kib_to_mib;

pub(super) fn render_table(plan: &Plan, r: &Results, mode: &str) -> String {
    let (d, m) = (&r.direct, &r.mesh);
    let ratio = |direct: f64, mesh: f64| format!("{:.2}x", mesh / direct);
    let added = |direct: f64, mesh: f64| format!("{:+.1} us", mesh - direct);
    let num = |v: f64, decimals| fixed(Some(v), decimals);
    let mut t = Table::new(["metric", "direct", "mesh", "mesh vs direct"]);
    t.row([
        "throughput, 1 connection (Gbit/s)".into(),
        num(d.gbps_one, 2),
        num(m.gbps_one, 2),
        ratio(d.gbps_one, m.gbps_one),
    ]);
    t.row([
        format!("throughput, {} connections (Gbit/s)", plan.streams),
        num(d.gbps_many, 2),
        num(m.gbps_many, 2),
        ratio(d.gbps_many, m.gbps_many),
    ]);
    for (name, dl, ml) in [
        ("1 KiB request/response", d.rr, m.rr),
        ("connect + 1 KiB req/resp + close", d.crr, m.crr),
    ] {
        t.row([
            format!("{name} p50 (us)"),
            num(dl.p50_us, 1),
            num(ml.p50_us, 1),
            added(dl.p50_us, ml.p50_us),
        ]);
        t.row([
            format!("{name} p99 (us)"),
            num(dl.p99_us, 1),
            num(ml.p99_us, 1),
            added(dl.p99_us, ml.p99_us),
        ]);
    }
    for (name, kib) in [
        "ztunnel RSS idle (MiB)".to_owned(),
        format!("ztunnel RSS, {} connections (MiB)", plan.hold_conns),
    ]
    .into_iter()
    .zip([r.rss_idle_kib, r.rss_held_kib])
    {
        t.row([name, fixed(None, 1), num(kib_to_mib(kib), 1), String::new()]);
    }
    format!(
        "mesh-bench l4: {mode}; {:.1} s per throughput test, {} round trips, {} connects; \
         RSS is the larger of the two ztunnels\n{}",
        plan.duration.as_secs_f64(),
        plan.rr_samples,
        plan.crr_samples,
        t.render()
    )
}

/// The JSON line scripts read; field names are a contract with CI.
#[derive(Debug, Serialize)]
pub(super) struct Summary {
    mode: &'static str,
    direct_gbps: f64,
    mesh_gbps: f64,
    throughput_ratio: f64,
    direct_gbps_8conn: f64,
    mesh_gbps_8conn: f64,
    rr_direct_p50_us: f64,
    rr_mesh_p50_us: f64,
    rr_added_p50_us: f64,
    rr_added_p99_us: f64,
    crr_direct_p50_us: f64,
    crr_direct_p99_us: f64,
    crr_mesh_p50_us: f64,
    crr_mesh_p99_us: f64,
    rss_idle_mib: f64,
    rss_1k_conns_mib: f64,
}

impl Summary {
    pub(super) fn new(r: &Results, mode: &str) -> Self {
        let (d, m) = (&r.direct, &r.mesh);
        let us = |v: f64| round(v, 1);
        Self {
            mode: if mode.starts_with("poll") {
                "poll"
            } else {
                "default"
            },
            direct_gbps: round(d.gbps_one, 2),
            mesh_gbps: round(m.gbps_one, 2),
            throughput_ratio: round(m.gbps_one / d.gbps_one, 3),
            direct_gbps_8conn: round(d.gbps_many, 2),
            mesh_gbps_8conn: round(m.gbps_many, 2),
            rr_direct_p50_us: us(d.rr.p50_us),
            rr_mesh_p50_us: us(m.rr.p50_us),
            rr_added_p50_us: us(m.rr.p50_us - d.rr.p50_us),
            rr_added_p99_us: us(m.rr.p99_us - d.rr.p99_us),
            crr_direct_p50_us: us(d.crr.p50_us),
            crr_direct_p99_us: us(d.crr.p99_us),
            crr_mesh_p50_us: us(m.crr.p50_us),
            crr_mesh_p99_us: us(m.crr.p99_us),
            rss_idle_mib: round(kib_to_mib(r.rss_idle_kib), 1),
            rss_1k_conns_mib: round(kib_to_mib(r.rss_held_kib), 1),
        }
    }
}
