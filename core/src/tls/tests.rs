use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;

fn id(td: &str, ns: &str, sa: &str) -> Identity {
    Identity::new(td, ns, sa).unwrap()
}

/// Runs one real handshake over a socket pair; returns the identity the server saw.
async fn handshake(
    server: &WorkloadCert,
    client: Option<&WorkloadCert>,
    expected_server: &Identity,
) -> Result<Identity, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server.server_config().unwrap());
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
        identity_of(&peer).map_err(|e| e.to_string())
    });
    let cfg = match client {
        Some(c) => c.client_config(expected_server).unwrap(),
        None => {
            // A client with no certificate at all.
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(WorkloadServerVerifier::new(
                    server.root_store.clone(),
                    expected_server.clone(),
                )))
                .with_no_client_auth();
            cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
            std::sync::Arc::new(cfg)
        }
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let client_result = async {
        let mut tls = TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    }
    .await;
    let server_result = srv.await.unwrap();
    client_result?;
    server_result
}

#[tokio::test]
async fn mutual_tls_carries_identities() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let srv_id = id("cluster.local", "default", "server");
    let cli_id = id("cluster.local", "default", "client");
    let srv = ca.issue(&srv_id, Duration::from_secs(3600)).unwrap();
    let cli = ca.issue(&cli_id, Duration::from_secs(3600)).unwrap();
    assert_eq!(handshake(&srv, Some(&cli), &srv_id).await.unwrap(), cli_id);
}

#[tokio::test]
async fn client_rejects_unexpected_server_identity() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let srv = ca
        .issue(
            &id("cluster.local", "default", "impostor"),
            Duration::from_secs(3600),
        )
        .unwrap();
    let cli = ca
        .issue(
            &id("cluster.local", "default", "client"),
            Duration::from_secs(3600),
        )
        .unwrap();
    let err = handshake(&srv, Some(&cli), &id("cluster.local", "default", "server"))
        .await
        .unwrap_err();
    assert!(err.contains("impostor"), "{err}");
}

#[tokio::test]
async fn server_rejects_bad_clients() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let other_root = CertificateAuthority::generate("cluster.local").unwrap();
    let other_td = CertificateAuthority::from_pem(ca.root_pem(), ca.key_pem()).unwrap();
    let srv_id = id("cluster.local", "default", "server");
    let srv = ca.issue(&srv_id, Duration::from_secs(3600)).unwrap();

    assert!(
        handshake(&srv, None, &srv_id).await.is_err(),
        "no client cert"
    );

    let foreign = other_root
        .issue(
            &id("cluster.local", "default", "c"),
            Duration::from_secs(3600),
        )
        .unwrap();
    let foreign = WorkloadCert::new(
        foreign.identity().clone(),
        foreign.chain().to_vec(),
        foreign.key().clone_key(),
        vec![ca.root().clone()],
    )
    .unwrap();
    assert!(
        handshake(&srv, Some(&foreign), &srv_id).await.is_err(),
        "other root"
    );

    let td = other_td
        .issue(&id("evil.local", "default", "c"), Duration::from_secs(3600))
        .unwrap();
    let err = handshake(&srv, Some(&td), &srv_id).await.unwrap_err();
    assert!(!err.is_empty());

    let now = SystemTime::now();
    let expired = ca
        .issue_valid(
            &id("cluster.local", "default", "c"),
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .unwrap();
    assert!(
        handshake(&srv, Some(&expired), &srv_id).await.is_err(),
        "expired"
    );
}

#[test]
fn csr_checks() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let me = id("cluster.local", "default", "a");
    let (_, csr) = generate_csr(&me).unwrap();
    let chain = ca.sign_csr(&csr, &me, Duration::from_secs(60)).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(identity_of(&chain[0]).unwrap(), me);
    let other = id("cluster.local", "default", "b");
    assert!(matches!(
        ca.sign_csr(&csr, &other, Duration::from_secs(60)),
        Err(CaError::San { .. })
    ));
    assert!(matches!(
        ca.sign_csr("garbage", &me, Duration::from_secs(60)),
        Err(CaError::Csr(_))
    ));
}

#[test]
fn refresh_at_half_life() {
    let ca = CertificateAuthority::generate("cluster.local").unwrap();
    let now = SystemTime::now();
    let c = ca
        .issue_valid(
            &id("cluster.local", "a", "b"),
            now,
            now + Duration::from_secs(1000),
        )
        .unwrap();
    let half = c.refresh_at().duration_since(c.not_before()).unwrap();
    assert!((499..=501).contains(&half.as_secs()), "{half:?}");
}

/// A root and an intermediate it signed, as an operator would plug in (PEM).
fn operator_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let ca_params = |cn: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    };
    let root_key = KeyPair::generate().unwrap();
    let root = ca_params("operator root").self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(ca_params("operator root"), root_key);
    let inter_key = KeyPair::generate().unwrap();
    let inter = ca_params("operator intermediate")
        .signed_by(&inter_key, &root_issuer)
        .unwrap();
    (inter.pem(), inter_key.serialize_pem(), root.pem())
}

#[tokio::test]
async fn plugin_ca_signs_through_its_intermediate() {
    let (inter, inter_key, root) = operator_pki();
    let chain = format!("{inter}{root}");
    let ca = CertificateAuthority::from_plugin(&inter, &inter_key, &chain, &root).unwrap();
    assert_eq!(ca.root(), &pem::certs(&root).unwrap()[0]);
    let me = id("cluster.local", "default", "me");
    let (_key, csr) = generate_csr(&me).unwrap();
    let signed = ca.sign_csr(&csr, &me, Duration::from_secs(60)).unwrap();
    assert_eq!(signed.len(), 3, "leaf, intermediate, root");
    assert_eq!(signed[1], pem::certs(&inter).unwrap()[0]);

    // Workloads trusting only the operator's root verify each other through the chain.
    let server_id = id("cluster.local", "default", "server");
    let server = ca.issue(&server_id, Duration::from_secs(60)).unwrap();
    let client = ca.issue(&me, Duration::from_secs(60)).unwrap();
    assert_eq!(handshake(&server, Some(&client), &server_id).await, Ok(me));

    // A chain that does not lead from ca-cert to root-cert is refused at load.
    let wrong = CertificateAuthority::from_plugin(&inter, &inter_key, &inter, &root);
    assert!(matches!(wrong, Err(CaError::Load(_))));
}
