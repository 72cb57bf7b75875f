// PLACEHOLDER in branch wpapp: replaced by the engine at merge
//! The waypoint's L7 model (placeholder with the engine's signatures).

use mesh_core::proto::mesh::l7::v1 as pb;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

#[derive(Debug, Clone, Default, Serialize)]
pub struct Config {
    pub waypoint: String,
}

impl Config {
    pub fn from_proto(
        waypoint: &str,
        _services: &[pb::ServiceConfig],
        _policies: &[pb::Policy],
    ) -> (Config, Vec<ConfigError>) {
        let config = Config {
            waypoint: waypoint.to_owned(),
        };
        (config, Vec::new())
    }
}
