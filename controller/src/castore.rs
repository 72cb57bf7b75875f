//! Where the controller's certificate authority comes from: an operator's CA in Istio's
//! plug-in layout (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem` in one
//! folder) when given, else a root kept in the state folder, created on first start and
//! loaded on every start after (key file 0600, folder 0700). In Kubernetes mode the root is
//! kept in the Secret `istio-ca-secret` of the mesh's namespace instead
//! ([`load_or_create_secret`]), so that every replica and restart signs with the same root.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use mesh_core::tls::{CaError, CertificateAuthority};
use tracing::{info, warn};

/// The plug-in layout's file names.
pub const PLUGIN_FILES: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    "root-cert.pem",
];
const ROOT_CERT: &str = "root-cert.pem";
const ROOT_KEY: &str = "root-key.pem";

/// Which CA was loaded, for the startup log and `/config_dump`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CaOrigin {
    /// The operator's CA from this folder.
    Plugin(PathBuf),
    /// A root created now and saved in this folder.
    Created(PathBuf),
    /// The root saved in this folder by an earlier start.
    Loaded(PathBuf),
    /// A root created now and saved in this Secret (`namespace/name`).
    SecretCreated(String),
    /// The root kept in this Secret (`namespace/name`) by an earlier start or a replica.
    SecretLoaded(String),
}

/// The Secret that keeps the root in Kubernetes mode, and its keys.
pub const CA_SECRET: &str = "istio-ca-secret";
pub const SECRET_CERT: &str = "ca-cert.pem";
pub const SECRET_KEY: &str = "ca-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plug-in CA folder {dir} lacks {file} (it needs {PLUGIN_FILES:?})")]
    PluginIncomplete { dir: PathBuf, file: &'static str },
    #[error("state folder {dir} has {present} but not {missing}: restore it or remove both")]
    StateIncomplete {
        dir: PathBuf,
        present: &'static str,
        missing: &'static str,
    },
    #[error("CA in {dir}: {source}")]
    Ca { dir: PathBuf, source: CaError },
    #[error("{action} Secret {secret}: {source}")]
    Kube {
        action: &'static str,
        secret: String,
        source: kube::Error,
    },
    #[error("Secret {secret} lacks {key}: restore it or delete the Secret")]
    SecretIncomplete { secret: String, key: &'static str },
    #[error("CA in Secret {secret}: {source}")]
    SecretCa { secret: String, source: CaError },
}

/// The CA: from `plugin_dir` when it is given, else from (or newly into) `state_dir`.
pub fn load_or_create(
    plugin_dir: Option<&Path>,
    state_dir: &Path,
    trust_domain: &str,
) -> Result<(CertificateAuthority, CaOrigin), CaStoreError> {
    if let Some(dir) = plugin_dir {
        let ca = load_plugin(dir)?;
        info!(dir = %dir.display(), "using the operator's CA");
        return Ok((ca, CaOrigin::Plugin(dir.to_owned())));
    }
    let cert_path = state_dir.join(ROOT_CERT);
    let key_path = state_dir.join(ROOT_KEY);
    let ca_err = |source| CaStoreError::Ca {
        dir: state_dir.to_owned(),
        source,
    };
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            warn_if_readable_by_others(&key_path);
            let ca = CertificateAuthority::from_pem(&read(&cert_path)?, &read(&key_path)?)
                .map_err(ca_err)?;
            info!(dir = %state_dir.display(), "loaded the mesh root CA");
            Ok((ca, CaOrigin::Loaded(state_dir.to_owned())))
        }
        (false, false) => {
            let ca = CertificateAuthority::generate(trust_domain).map_err(ca_err)?;
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(state_dir)
                .map_err(|source| io_err(state_dir, source))?;
            // The key first: a crash between the two leaves a state the next start
            // reports instead of a root without its key.
            write_private(&key_path, ca.key_pem())?;
            write_private(&cert_path, ca.root_pem())?;
            info!(dir = %state_dir.display(), "created the mesh root CA");
            Ok((ca, CaOrigin::Created(state_dir.to_owned())))
        }
        (true, false) => Err(CaStoreError::StateIncomplete {
            dir: state_dir.to_owned(),
            present: ROOT_CERT,
            missing: ROOT_KEY,
        }),
        (false, true) => Err(CaStoreError::StateIncomplete {
            dir: state_dir.to_owned(),
            present: ROOT_KEY,
            missing: ROOT_CERT,
        }),
    }
}

/// Kubernetes mode's CA: from `plugin_dir` when it is given, else from the Secret
/// [`CA_SECRET`] in `namespace`, created (with a new root) when absent. When another
/// replica creates it first, its root is used.
pub async fn load_or_create_secret(
    plugin_dir: Option<&Path>,
    client: kube::Client,
    namespace: &str,
    trust_domain: &str,
) -> Result<(CertificateAuthority, CaOrigin), CaStoreError> {
    use k8s_openapi::api::core::v1::Secret;
    if let Some(dir) = plugin_dir {
        let ca = load_plugin(dir)?;
        info!(dir = %dir.display(), "using the operator's CA");
        return Ok((ca, CaOrigin::Plugin(dir.to_owned())));
    }
    let secret = format!("{namespace}/{CA_SECRET}");
    let kube_err = |action, source| CaStoreError::Kube {
        action,
        secret: secret.clone(),
        source,
    };
    let api: kube::Api<Secret> = kube::Api::namespaced(client, namespace);
    if let Some(found) = api
        .get_opt(CA_SECRET)
        .await
        .map_err(|e| kube_err("reading", e))?
    {
        let ca = ca_from_secret(&found, &secret)?;
        info!(%secret, "loaded the mesh root CA");
        return Ok((ca, CaOrigin::SecretLoaded(secret)));
    }
    let ca =
        CertificateAuthority::generate(trust_domain).map_err(|source| CaStoreError::SecretCa {
            secret: secret.clone(),
            source,
        })?;
    let data = [(SECRET_CERT, ca.root_pem()), (SECRET_KEY, ca.key_pem())]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), k8s_openapi::ByteString(v.as_bytes().to_vec())))
        .collect();
    let new = Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(CA_SECRET.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        type_: Some("istio.io/ca-root".to_owned()),
        data: Some(data),
        ..Default::default()
    };
    match api.create(&kube::api::PostParams::default(), &new).await {
        Ok(_) => {
            info!(%secret, "created the mesh root CA");
            Ok((ca, CaOrigin::SecretCreated(secret)))
        }
        Err(kube::Error::Api(status)) if status.is_already_exists() || status.is_conflict() => {
            let found = api
                .get(CA_SECRET)
                .await
                .map_err(|e| kube_err("reading", e))?;
            let ca = ca_from_secret(&found, &secret)?;
            info!(%secret, "another replica created the mesh root CA first; using it");
            Ok((ca, CaOrigin::SecretLoaded(secret)))
        }
        Err(e) => Err(kube_err("creating", e)),
    }
}

fn ca_from_secret(
    found: &k8s_openapi::api::core::v1::Secret,
    secret: &str,
) -> Result<CertificateAuthority, CaStoreError> {
    let text = |key: &'static str| {
        found
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| CaStoreError::SecretIncomplete {
                secret: secret.to_owned(),
                key,
            })
    };
    CertificateAuthority::from_pem(&text(SECRET_CERT)?, &text(SECRET_KEY)?).map_err(|source| {
        CaStoreError::SecretCa {
            secret: secret.to_owned(),
            source,
        }
    })
}

fn load_plugin(dir: &Path) -> Result<CertificateAuthority, CaStoreError> {
    let mut texts = Vec::with_capacity(PLUGIN_FILES.len());
    for file in PLUGIN_FILES {
        let path = dir.join(file);
        if !path.exists() {
            return Err(CaStoreError::PluginIncomplete {
                dir: dir.to_owned(),
                file,
            });
        }
        texts.push(read(&path)?);
    }
    warn_if_readable_by_others(&dir.join("ca-key.pem"));
    CertificateAuthority::from_plugin(&texts[0], &texts[1], &texts[2], &texts[3]).map_err(
        |source| CaStoreError::Ca {
            dir: dir.to_owned(),
            source,
        },
    )
}

fn read(path: &Path) -> Result<String, CaStoreError> {
    fs::read_to_string(path).map_err(|source| io_err(path, source))
}

/// Writes `text` to a new file readable by the owner only, then moves it into place.
fn write_private(path: &Path, text: &str) -> Result<(), CaStoreError> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|source| io_err(&tmp, source))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| io_err(&tmp, source))?;
    fs::rename(&tmp, path).map_err(|source| io_err(path, source))
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warn!(path = %path.display(), mode = format!("{mode:o}"), "CA key is readable by others than its owner");
        }
    }
}

fn io_err(path: &Path, source: std::io::Error) -> CaStoreError {
    CaStoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("castore-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn root_is_created_once_private_and_reloaded() {
        let dir = temp_dir("state").join("ca");
        let (first, origin) = load_or_create(None, &dir, "cluster.local").unwrap();
        assert_eq!(origin, CaOrigin::Created(dir.clone()));
        for (file, want) in [(ROOT_KEY, 0o600), (ROOT_CERT, 0o600)] {
            let mode = fs::metadata(dir.join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, want, "{file}");
        }
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let (second, origin) = load_or_create(None, &dir, "cluster.local").unwrap();
        assert_eq!(origin, CaOrigin::Loaded(dir.clone()));
        assert_eq!(first.root(), second.root(), "the same root after a restart");

        fs::remove_file(dir.join(ROOT_KEY)).unwrap();
        let err = load_or_create(None, &dir, "cluster.local").unwrap_err();
        assert!(matches!(err, CaStoreError::StateIncomplete { .. }), "{err}");
        let _ = fs::remove_dir_all(dir.parent().unwrap());
    }

    #[test]
    fn plugin_folder_wins_and_must_be_complete() {
        let state = temp_dir("unused");
        let dir = temp_dir("plugin");
        fs::create_dir_all(&dir).unwrap();
        // A self-signed operator root that also signs: the chain is just the root.
        let op = CertificateAuthority::generate("cluster.local").unwrap();
        fs::write(dir.join("ca-cert.pem"), op.root_pem()).unwrap();
        fs::write(dir.join("ca-key.pem"), op.key_pem()).unwrap();
        fs::write(dir.join("cert-chain.pem"), op.root_pem()).unwrap();
        let err = load_or_create(Some(&dir), &state, "cluster.local").unwrap_err();
        assert!(err.to_string().contains("root-cert.pem"), "{err}");

        fs::write(dir.join("root-cert.pem"), op.root_pem()).unwrap();
        let (ca, origin) = load_or_create(Some(&dir), &state, "cluster.local").unwrap();
        assert_eq!(origin, CaOrigin::Plugin(dir.clone()));
        assert_eq!(ca.root(), op.root());
        assert!(
            !state.exists(),
            "no root is created when the operator brings one"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
