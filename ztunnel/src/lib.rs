//! ztunnel: the per-node L4 proxy of the ambient mesh.
//!
//! Owns, for the workloads of one node: capture listeners (outbound, inbound plaintext,
//! SOCKS5), the inbound HBONE server, L4 AuthorizationPolicy, the node's workload
//! certificates, L4 metrics and access logs. It must not parse HTTP inside tunnels (that is
//! the waypoint's job) and depends only on `mesh-core`, never on `waypoint` or `controller`.

pub mod app;
pub mod capture;
pub mod config;
pub mod inbound;
pub mod localfile;
pub mod model;
pub mod outbound;
pub mod policy;
pub mod proxy;
pub mod telemetry;
pub mod xds;
