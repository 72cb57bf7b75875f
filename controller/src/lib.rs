//! controller: the mesh's control plane. It turns what users apply into workload
//! identities and config and serves both to every proxy.
//!
//! The object model and its sources (`objects`, `kube_source`), translation into Address,
//! Authorization and the waypoints' L7 resources (`translate`), the certificate
//! authority's gRPC service (`ca`), where its root comes from (`castore`), the delta ADS
//! server (`xds`) and the wiring (`app`). Still to come: the waypoint deployer and Gateway
//! status in Kubernetes mode.
//! It must not carry traffic: proxies depend on `mesh-core`, never on this crate.

pub mod app;
pub mod ca;
pub mod castore;
pub mod kube_source;
pub mod objects;
pub mod serving;
pub mod translate;
pub mod xds;
