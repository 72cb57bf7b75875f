//! The ztunnel's runtime config: flags (and, later, environment) converted into one
//! validated `Config`, which `/config_dump` shows as it runs (secrets left out).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::capture::CaptureMode;

#[derive(Clone, Debug, Serialize)]
pub struct Ports {
    pub hbone: u16,
    pub outbound: u16,
    pub inbound_plaintext: u16,
    pub socks5: u16,
    pub admin: u16,
    pub metrics: u16,
    pub readiness: u16,
}

impl Default for Ports {
    fn default() -> Self {
        Ports {
            hbone: mesh_core::hbone::PORT,
            outbound: 15001,
            inbound_plaintext: 15006,
            socks5: 15080,
            admin: 15000,
            metrics: 15020,
            readiness: 15021,
        }
    }
}

/// Where config and certificates come from.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase", tag = "mode")]
pub enum Source {
    /// One YAML file (see `examples/local-mesh.yaml`) and a development CA on disk.
    #[serde(rename_all = "camelCase")]
    Local {
        config_file: PathBuf,
        ca_cert: PathBuf,
        ca_key: PathBuf,
    },
    /// The controller: delta ADS for config, CreateCertificate for certificates.
    #[serde(rename_all = "camelCase")]
    Controller {
        /// `http://host:15010`, or `https://host:15012` with `root_cert`.
        address: String,
        /// The mesh root (PEM file) that signed the controller's serving certificate.
        root_cert: Option<PathBuf>,
        /// Bearer token; never shown in dumps.
        #[serde(skip)]
        token: Option<String>,
        /// How long to wait for the first full config before serving anyway.
        initial_sync_timeout: Duration,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// The node whose workloads this ztunnel serves.
    pub node: String,
    pub source: Source,
    /// The trust domain of workloads whose resources name none.
    pub trust_domain: String,
    /// Address of the node-level listeners (outbound, plaintext inbound, SOCKS5, admin).
    pub listen_ip: IpAddr,
    pub ports: Ports,
    pub cert_lifetime: Duration,
    pub hbone: mesh_core::hbone::Config,
    /// How often the config file is checked for changes.
    pub config_poll: Duration,
    pub drain_deadline: Duration,
    /// Write access-log lines to stdout.
    pub access_log_stdout: bool,
    /// How pods' traffic reaches the listeners. In a capture mode the outbound, plaintext
    /// and HBONE listeners are transparent on the wildcard address, deliveries keep the
    /// client's source address, and the node's routing and rules are set up and removed.
    pub capture: CaptureMode,
}

impl Config {
    /// Local mode: config from a file, certificates from a development CA.
    pub fn new(node: &str, config_file: PathBuf, ca_cert: PathBuf, ca_key: PathBuf) -> Self {
        Self::with_source(
            node,
            Source::Local {
                config_file,
                ca_cert,
                ca_key,
            },
        )
    }

    /// Config and certificates from the controller at `address` (`http://host:15010`).
    pub fn with_controller(node: &str, address: &str, token: Option<String>) -> Self {
        Self::with_source(
            node,
            Source::Controller {
                address: address.to_owned(),
                root_cert: None,
                token,
                initial_sync_timeout: Duration::from_secs(10),
            },
        )
    }

    pub fn with_source(node: &str, source: Source) -> Self {
        Config {
            node: node.to_owned(),
            source,
            trust_domain: mesh_core::identity::DEFAULT_TRUST_DOMAIN.to_owned(),
            listen_ip: IpAddr::from([127, 0, 0, 1]),
            ports: Ports::default(),
            cert_lifetime: Duration::from_secs(24 * 3600),
            hbone: mesh_core::hbone::Config::default(),
            config_poll: Duration::from_millis(200),
            drain_deadline: Duration::from_secs(5),
            access_log_stdout: true,
            capture: CaptureMode::None,
        }
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.listen_ip, port)
    }
}
