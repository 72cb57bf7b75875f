//! What `mesh-bench l4` prints: the table for people, then the JSON line for scripts.

use serde::Serialize;

use super::{Plan, Results};
use crate::bench::cpu_latency::json_mode;
use crate::bench::report::{fixed, round, Table};
use crate::bench::rss::kib_to_mib;
use crate::bench::stats::LatencySummary;

pub(super) fn render_table(plan: &Plan, r: &Results, mode: &str) -> String {
    let (d, f, m) = (&r.direct, &r.relays, &r.mesh);
    let ratio = |base: f64, v: f64| format!("{:.2}x", v / base);
    let added = |base: f64, v: f64| format!("{:+.1} us", v - base);
    let num = |v: f64, decimals| fixed(Some(v), decimals);
    let mut t = Table::new([
        "metric",
        "direct",
        "2 relays",
        "mesh",
        "mesh vs direct",
        "mesh vs relays",
    ]);
    for (name, dv, fv, mv) in [
        (
            "throughput, 1 connection (Gbit/s)".to_owned(),
            d.gbps_one,
            f.gbps_one,
            m.gbps_one,
        ),
        (
            format!("throughput, {} connections (Gbit/s)", plan.streams),
            d.gbps_many,
            f.gbps_many,
            m.gbps_many,
        ),
    ] {
        t.row([
            name,
            num(dv, 2),
            num(fv, 2),
            num(mv, 2),
            ratio(dv, mv),
            ratio(fv, mv),
        ]);
    }
    for (name, dl, fl, ml) in [
        ("1 KiB request/response", d.rr, f.rr, m.rr),
        ("connect + 1 KiB req/resp + close", d.crr, f.crr, m.crr),
    ] {
        let p50: fn(LatencySummary) -> f64 = |l| l.p50_us;
        let p99: fn(LatencySummary) -> f64 = |l| l.p99_us;
        for (pct, pick) in [("p50", p50), ("p99", p99)] {
            t.row([
                format!("{name} {pct} (us)"),
                num(pick(dl), 1),
                num(pick(fl), 1),
                num(pick(ml), 1),
                added(pick(dl), pick(ml)),
                added(pick(fl), pick(ml)),
            ]);
        }
    }
    for (name, kib) in [
        "ztunnel RSS idle (MiB)".to_owned(),
        format!("ztunnel RSS, {} connections (MiB)", plan.hold_conns),
    ]
    .into_iter()
    .zip([r.rss_idle_kib, r.rss_held_kib])
    {
        let none = || fixed(None, 1);
        t.row([
            name,
            none(),
            none(),
            num(kib_to_mib(kib), 1),
            none(),
            none(),
        ]);
    }
    format!(
        "mesh-bench l4: {mode}; {:.1} s per throughput test, {} round trips, {} connects; \
         RSS is the larger of the two ztunnels; \"2 relays\" is the same path (SOCKS5 into the \
         first) through two plain TCP relay processes, no TLS, no HTTP/2: the floor of the \
         topology\n{}",
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
    relays_gbps: f64,
    relays_throughput_ratio: f64,
    rr_relays_added_p50_us: f64,
    crr_relays_p50_us: f64,
}

impl Summary {
    pub(super) fn new(r: &Results, mode: &str) -> Self {
        let (d, f, m) = (&r.direct, &r.relays, &r.mesh);
        let us = |v: f64| round(v, 1);
        Self {
            mode: json_mode(mode),
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
            relays_gbps: round(f.gbps_one, 2),
            relays_throughput_ratio: round(f.gbps_one / d.gbps_one, 3),
            rr_relays_added_p50_us: us(f.rr.p50_us - d.rr.p50_us),
            crr_relays_p50_us: us(f.crr.p50_us),
        }
    }
}
