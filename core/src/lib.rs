//! mesh-core: what every proxy of the mesh shares.
//!
//! Owns workload identity and certificates (and the manager that keeps a proxy's issued and
//! renewed), the address model (workloads, services, waypoints) every proxy reads, the
//! mesh's TLS policy, HBONE (client pool and
//! server), the SOCKS5 wire protocol (server and client), the generated protobuf types of
//! the control-plane protocols (`proto`) and their clients (`xds`, `ca_client`), the drain primitive, and the
//! admin/metrics/readiness servers. It must not know about any one proxy's own config,
//! policy or routing: those live in `ztunnel` and `waypoint`, which depend on this crate
//! and never on each other.

pub mod addresses;
pub mod admin;
pub mod authz_manifest;
pub mod ca_client;
pub mod certs;
pub mod control_plane;
pub mod drain;
pub mod hbone;
pub mod identity;
pub mod proto;
pub mod socks5;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;
pub mod xds;

pub use identity::Identity;
