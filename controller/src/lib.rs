//! controller: the mesh's control plane. It turns what users apply into workload
//! identities and config and serves both to every proxy.
//!
//! Built so far: the object model and directory source (`objects`), translation into
//! Address resources (`translate`), the certificate authority's gRPC service (`ca`), where
//! its root comes from (`castore`) and the local-mode wiring (`app`). Still to come: the
//! Kubernetes source, Authorization translation, the delta ADS server.
//! It must not carry traffic: proxies depend on `mesh-core`, never on this crate.

pub mod app;
pub mod ca;
pub mod castore;
pub mod kube_source;
pub mod objects;
pub mod serving;
pub mod translate;
pub mod xds;
