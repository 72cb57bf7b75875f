// PLACEHOLDER in branch wpapp: replaced by the engine at merge
//! The HTTP engine (placeholder with the engine's signatures, so the app builds in this
//! branch): it answers nothing and closes each tunnel it is given.

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;

use crate::backend::{Backends, BoxIo, Downstream};
use crate::config::Config;

pub struct Engine {
    _backends: Arc<dyn Backends>,
    config: ArcSwap<Config>,
}

impl Engine {
    pub fn new(backends: Arc<dyn Backends>, _registry: &mut Registry) -> Arc<Engine> {
        Arc::new(Engine {
            _backends: backends,
            config: ArcSwap::from_pointee(Config::default()),
        })
    }

    pub fn update(&self, config: Arc<Config>) {
        self.config.store(config);
    }

    /// Serves HTTP on one tunnel until it closes.
    pub async fn serve(&self, io: BoxIo, downstream: Downstream) {
        tracing::warn!(service = %downstream.service, "HTTP engine not in this build; closing the tunnel");
        drop(io);
    }
}
