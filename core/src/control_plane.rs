//! How a proxy reaches the controller: plaintext gRPC (15010, local and development) or
//! TLS (15012), verifying the controller's serving certificate against the mesh root.
//! One lazily connecting channel serves both delta ADS and the CA; tonic redials it.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::tls::{pem, provider};

const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 1 << 20;

/// The controller's serving name when its address is an IP (as istiod's is).
pub const DEFAULT_SERVER_NAME: &str = "istiod.istio-system.svc";

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("invalid controller address {0:?} (want http://host:port or https://host:port)")]
    Address(String),
    #[error("https address {0:?} needs the mesh root certificate to verify the controller")]
    NoRoot(String),
    #[error("root certificate: {0}")]
    Root(String),
}

/// A proxy's bearer token for the controller, from the file a flag names (a projected
/// service-account token in Kubernetes), surrounding whitespace trimmed.
pub fn read_token(path: &std::path::Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}

/// Where the controller is and how to trust it.
#[derive(Clone)]
pub struct ControlPlane {
    address: String,
    /// `host:port` to dial.
    authority: String,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("address", &self.address)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl ControlPlane {
    /// As [`ControlPlane::new`], with the mesh root read from a PEM file.
    pub fn with_root_file(
        address: &str,
        root_file: Option<&std::path::Path>,
    ) -> Result<Self, ControlPlaneError> {
        let root = root_file
            .map(|p| {
                std::fs::read_to_string(p)
                    .map_err(|e| ControlPlaneError::Root(format!("reading {}: {e}", p.display())))
            })
            .transpose()?;
        Self::new(address, root.as_deref(), None)
    }

    /// `http://host:port`, or `https://host:port` with `root_pem` (the mesh root) to
    /// verify the controller's certificate for `host` (or `server_name` when given).
    pub fn new(
        address: &str,
        root_pem: Option<&str>,
        server_name: Option<&str>,
    ) -> Result<Self, ControlPlaneError> {
        let bad = || ControlPlaneError::Address(address.to_owned());
        let uri: Uri = address.parse().map_err(|_| bad())?;
        let host = uri.host().ok_or_else(bad)?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => {
                let root = root_pem.ok_or_else(|| ControlPlaneError::NoRoot(address.to_owned()))?;
                let name = server_name.unwrap_or(&host).to_owned();
                let name = ServerName::try_from(name)
                    .map_err(|e| ControlPlaneError::Address(format!("{address}: {e}")))?;
                Some((client_config(root)?, name))
            }
            _ => return Err(bad()),
        };
        let port = uri
            .port_u16()
            .unwrap_or(if tls.is_some() { 15012 } else { 15010 });
        Ok(ControlPlane {
            address: address.to_owned(),
            authority: format!("{}:{port}", uri.host().ok_or_else(bad)?),
            tls,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// A channel that connects on first use and redials after a failure.
    pub fn channel(&self) -> Channel {
        match self.connector() {
            None => self.endpoint().connect_lazy(),
            Some(c) => self.endpoint().connect_with_connector_lazy(c),
        }
    }

    /// A channel connected now: fails if the controller cannot be reached or trusted.
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        match self.connector() {
            None => self.endpoint().connect().await,
            Some(c) => self.endpoint().connect_with_connector(c).await,
        }
    }

    fn endpoint(&self) -> Endpoint {
        // tonic sees plain http: TLS, when wanted, is done by the connector.
        Endpoint::from_shared(format!("http://{}", self.authority))
            .expect("authority was parsed from a valid URI")
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            // A full push of a large mesh is megabytes: let it come in large frames
            // without waiting on window updates (the sizes HBONE uses).
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
    }

    /// Dials TCP and completes TLS, verifying the controller; `None` for plaintext.
    #[allow(clippy::type_complexity)]
    fn connector(
        &self,
    ) -> Option<
        impl tower::Service<
                Uri,
                Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
                Error = std::io::Error,
                Future = impl Send,
            > + Clone
            + Send
            + 'static,
    > {
        let (config, name) = self.tls.clone()?;
        let connector = TlsConnector::from(config);
        let authority = self.authority.clone();
        Some(tower::service_fn(move |_: Uri| {
            let (connector, name, authority) = (connector.clone(), name.clone(), authority.clone());
            async move {
                let tcp = TcpStream::connect(authority).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
    }
}

fn client_config(root_pem: &str) -> Result<Arc<ClientConfig>, ControlPlaneError> {
    let mut roots = RootCertStore::empty();
    let certs = pem::certs(root_pem).map_err(|e| ControlPlaneError::Root(e.to_string()))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(ControlPlaneError::Root("no usable certificate".into()));
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ControlPlaneError::Root(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}
