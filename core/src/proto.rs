//! Generated code for the mesh's wire protocols (`core/proto/*.proto`, built by `build.rs`):
//! Istio's workload and authorization resources and certificate service, and Envoy's delta
//! aggregated discovery service. Packages, message names and field numbers are the
//! upstream ones, so Istio's programs and ours can talk to each other; modules nest as the
//! packages do, which the generated cross-package paths rely on.

#![allow(clippy::all, missing_docs)]

pub mod istio {
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
    pub mod security {
        tonic::include_proto!("istio.security");
    }
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

/// The waypoint's own L7 types (`proto/l7.proto`).
pub mod mesh {
    pub mod l7 {
        pub mod v1 {
            tonic::include_proto!("mesh.l7.v1");
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// `type_url`s of the resources the mesh serves over delta ADS.
pub mod type_url {
    pub const ADDRESS: &str = "type.googleapis.com/istio.workload.Address";
    pub const AUTHORIZATION: &str = "type.googleapis.com/istio.security.Authorization";
    pub const L7_SERVICE: &str = "type.googleapis.com/mesh.l7.v1.ServiceConfig";
    pub const L7_POLICY: &str = "type.googleapis.com/mesh.l7.v1.Policy";
}

#[cfg(test)]
mod tests;
