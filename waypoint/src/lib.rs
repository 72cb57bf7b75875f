//! waypoint: the optional L7 proxy of the ambient mesh, one per namespace (or service
//! account), created when a user applies a Gateway of class `istio-waypoint`.
//!
//! Owns, for the services that name it: the HBONE server on 15008 (through `mesh-core`),
//! HTTP/1.1, HTTP/2 and gRPC inside each tunnel, routing, L7 policy and JWT, resilience
//! (timeouts, retries, faults, mirroring), upstream load balancing, pools and outlier
//! detection, and L7 metrics, access logs and traces. Upstream traffic leaves over HBONE
//! to the chosen endpoint's node with the waypoint's own identity.
//! It must not capture traffic or enforce node-level L4 policy (ztunnel's job) and depends
//! only on `mesh-core`, never on `ztunnel` or `controller`.

pub mod backend;
pub mod config;
pub mod http;
