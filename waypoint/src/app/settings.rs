//! The waypoint's runtime settings: flags converted into one validated struct, shown by
//! `/config_dump` as it runs (the token left out).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use mesh_core::identity::{Identity, IdentityError};
use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Ports {
    pub hbone: u16,
    pub admin: u16,
    pub metrics: u16,
    pub readiness: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            hbone: mesh_core::hbone::PORT,
            admin: 15000,
            metrics: 15020,
            readiness: 15021,
        }
    }
}

/// Who signs the waypoint's certificate.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase", tag = "mode")]
pub enum CaSource {
    /// The controller's CA (CreateCertificate with the token).
    Controller,
    /// A development CA on disk (local mode).
    #[serde(rename_all = "camelCase")]
    Local { ca_cert: PathBuf, ca_key: PathBuf },
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// `<namespace>/<gateway name>`: the name L7 config uses for this waypoint.
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    /// The controller's gRPC address (delta ADS, and CA unless `ca` is local).
    pub controller: String,
    /// The mesh root (PEM file) that signed the controller's serving certificate.
    pub root_cert: Option<PathBuf>,
    /// Bearer token for the controller; never shown in dumps.
    #[serde(skip)]
    pub token: Option<String>,
    pub ca: CaSource,
    /// Address of the HBONE, metrics and readiness listeners (the pod's).
    pub listen_ip: IpAddr,
    /// Address of the admin listener (`/config_dump`).
    pub admin_ip: IpAddr,
    pub ports: Ports,
    pub cert_lifetime: Duration,
    pub hbone: mesh_core::hbone::Config,
    /// The port endpoints' ztunnels take HBONE on.
    pub upstream_hbone_port: u16,
    /// How long to wait for the first full config before serving anyway.
    pub initial_sync_timeout: Duration,
    /// How long an undeclared port's client has to send its first bytes before the tunnel
    /// is taken for opaque TCP (server-first protocols send nothing).
    pub sniff_timeout: Duration,
    pub drain_deadline: Duration,
}

impl Settings {
    /// Settings for waypoint `name` (`<namespace>/<gateway>`) running as service account
    /// `service_account`, with config from `controller`.
    pub fn new(name: &str, service_account: &str, controller: &str) -> Self {
        let namespace = name.split_once('/').map_or(name, |(ns, _)| ns);
        Settings {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            trust_domain: mesh_core::identity::DEFAULT_TRUST_DOMAIN.to_owned(),
            controller: controller.to_owned(),
            root_cert: None,
            token: None,
            ca: CaSource::Controller,
            listen_ip: IpAddr::from([0, 0, 0, 0]),
            admin_ip: IpAddr::from([127, 0, 0, 1]),
            ports: Ports::default(),
            cert_lifetime: Duration::from_secs(24 * 3600),
            hbone: mesh_core::hbone::Config::default(),
            upstream_hbone_port: mesh_core::hbone::PORT,
            initial_sync_timeout: Duration::from_secs(10),
            sniff_timeout: Duration::from_secs(1),
            drain_deadline: Duration::from_secs(5),
        }
    }

    pub fn identity(&self) -> Result<Identity, IdentityError> {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.listen_ip, port)
    }
}
