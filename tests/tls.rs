//! h2 over TLS, and client-certificate verification (mTLS), with certificates made in the test.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use kohaku_sink::testkit::ControlledSink;
use kohaku_sink::StatsSink;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf certificate for `name`, and its key.
    fn issue(&self, name: &str) -> (String, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let certificate = params.signed_by(&key, &self.issuer).unwrap();
        (certificate.pem(), key)
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(server_ca: &Ca, identity: Option<(&str, &KeyPair)>) -> Arc<rustls::ClientConfig> {
    client_config_offering(server_ca, identity, &[b"h2"])
}

/// A client offering the ALPN protocols `alpn` (none: as many HTTP/1.1 clients connect).
fn client_config_offering(
    server_ca: &Ca,
    identity: Option<(&str, &KeyPair)>,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.der()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((pem, key)) => {
            let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Arc::new(config)
}

/// Writes the server's certificate files and returns a config serving TLS with them.
fn tls_config(dir: &Path, server_ca: &Ca, client_ca_path: Option<&Path>) -> kohaku::config::Config {
    let (chain, key) = server_ca.issue("localhost");
    std::fs::write(dir.join("fullchain.pem"), chain + &server_ca.pem()).unwrap();
    std::fs::write(dir.join("privkey.pem"), key.serialize_pem()).unwrap();
    let mut config = test_config();
    config.server.https = true;
    config.server.tls_fullchain_file = Some(dir.join("fullchain.pem"));
    config.server.tls_privkey_file = Some(dir.join("privkey.pem"));
    config.server.tls_verify_cacert_path = client_ca_path.map(Path::to_owned);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_over_tls_stores_reports() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("kohaku test server CA");
    let mut config = tls_config(dir.path(), &server_ca, None);
    config.exporter.https = true;
    let (sink, db) = sqlite_sink(dir.path()).await;
    let app = start(&config, vec![sink]).await;

    let client = H2::connect_tls(app.ingest_addr(), client_config(&server_ca, None))
        .await
        .expect("TLS with ALPN h2");
    let answer = client.post_report(small_report(1, 6).to_string()).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
    assert_eq!(
        wait_for_sqlite_rows(&db, 6, Duration::from_secs(10)).await,
        6
    );

    // Plain h2c to a TLS port is not served.
    let tcp = tokio::net::TcpStream::connect(app.ingest_addr())
        .await
        .unwrap();
    let plain = hyper::client::conn::http2::handshake::<_, _, http_body_util::Full<bytes::Bytes>>(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await;
    if let Ok((mut sender, connection)) = plain {
        tokio::spawn(connection);
        let request = http::Request::get(format!("http://{}/.ok", app.ingest_addr()))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        assert!(sender.send_request(request).await.is_err());
    }
    app.shutdown().await;
}

/// Sora's stats webhook is HTTP/1.1: over TLS it must work whether the client offers ALPN
/// `http/1.1` or no ALPN at all, with and without a client certificate (mTLS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_over_http1_tls_and_mtls_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("kohaku test server CA");
    let client_ca = Ca::new("sora client CA");
    std::fs::write(dir.path().join("clients.pem"), client_ca.pem()).unwrap();
    let config = tls_config(
        dir.path(),
        &server_ca,
        Some(&dir.path().join("clients.pem")),
    );
    let (sink, db) = sqlite_sink(dir.path()).await;
    let app = start(&config, vec![sink]).await;
    let (client_pem, client_key) = client_ca.issue("sora");

    let mut objects = 0;
    for (seed, alpn) in [(1u64, &[b"http/1.1".as_slice()][..]), (2, &[][..])] {
        let tls = client_config_offering(&server_ca, Some((&client_pem, &client_key)), alpn);
        let client = H1::connect_tls(app.ingest_addr(), tls)
            .await
            .expect("HTTP/1.1 over TLS");
        for report in 0..3 {
            let body = small_webhook(seed * 10 + report, 4).to_string();
            let answer = client.post_webhook(WEBHOOK_PATH, body).await;
            assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
            objects += 4;
        }
    }
    assert_eq!(
        wait_for_sqlite_rows(&db, objects, Duration::from_secs(10)).await,
        objects
    );
    // Without a client certificate the handshake is refused, whatever the protocol.
    let anonymous = client_config_offering(&server_ca, None, &[b"http/1.1"]);
    match H1::connect_tls(app.ingest_addr(), anonymous).await {
        Err(_) => {}
        Ok(client) => {
            let request = client
                .request(http::Method::GET, "/.ok")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            assert!(
                client.send(request).await.is_err(),
                "served without a certificate"
            );
        }
    }
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_accepts_only_clients_of_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("kohaku test server CA");
    let sora_ca = Ca::new("sora client CA");
    let other_ca = Ca::new("some other CA");
    // The CA given as a directory of PEM files, as Sora deployments often do.
    let ca_dir = dir.path().join("client-cas");
    std::fs::create_dir(&ca_dir).unwrap();
    std::fs::write(ca_dir.join("sora.pem"), sora_ca.pem()).unwrap();
    std::fs::write(ca_dir.join("README.txt"), "not a certificate").unwrap();
    let config = tls_config(dir.path(), &server_ca, Some(&ca_dir));
    let sink = ControlledSink::new("memory");
    let app = start(&config, vec![sink.clone() as Arc<dyn StatsSink>]).await;

    // No client certificate: refused.
    assert!(
        is_refused(app.ingest_addr(), client_config(&server_ca, None)).await,
        "a client without a certificate must be refused"
    );

    // A certificate from another CA: refused.
    let (other_pem, other_key) = other_ca.issue("intruder");
    assert!(
        is_refused(
            app.ingest_addr(),
            client_config(&server_ca, Some((&other_pem, &other_key)))
        )
        .await,
        "a certificate of another CA must be refused"
    );
    assert_eq!(sink.write_calls(), 0);

    // Sora's certificate: accepted, and the report is stored.
    let (sora_pem, sora_key) = sora_ca.issue("sora-node-1");
    let client = H2::connect_tls(
        app.ingest_addr(),
        client_config(&server_ca, Some((&sora_pem, &sora_key))),
    )
    .await
    .expect("Sora's certificate is accepted");
    let answer = client.post_report(small_report(3, 4).to_string()).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
    assert!(sink.wait_for_rows(4, Duration::from_secs(10)).await);
    app.shutdown().await;
}

/// Whether the server refuses this client: during the handshake, or (TLS 1.3 reports a refused
/// client certificate after it) on the first request.
async fn is_refused(addr: std::net::SocketAddr, config: Arc<rustls::ClientConfig>) -> bool {
    match H2::connect_tls(addr, config).await {
        Err(_) => true,
        Ok(client) => {
            let request = client
                .request(http::Method::GET, "/.ok")
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            client.send(request).await.is_err()
        }
    }
}

#[tokio::test]
async fn bad_tls_files_name_the_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("kohaku test server CA");
    let mut config = tls_config(dir.path(), &server_ca, None);
    config.server.tls_privkey_file = Some(dir.path().join("missing.pem"));
    let err = kohaku::server::tls::server_config(&config.server)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("server.tls_privkey_file") && err.contains("missing.pem"),
        "{err}"
    );

    let mut config = tls_config(dir.path(), &server_ca, None);
    std::fs::write(dir.path().join("empty.pem"), "nothing here").unwrap();
    config.server.tls_verify_cacert_path = Some(dir.path().join("empty.pem"));
    let err = kohaku::server::tls::server_config(&config.server)
        .unwrap_err()
        .to_string();
    assert!(err.contains("server.tls_verify_cacert_path"), "{err}");

    // A key that does not belong to the certificate.
    let mut config = tls_config(dir.path(), &server_ca, None);
    let stranger = KeyPair::generate().unwrap();
    std::fs::write(dir.path().join("stranger.pem"), stranger.serialize_pem()).unwrap();
    config.server.tls_privkey_file = Some(dir.path().join("stranger.pem"));
    let err = kohaku::server::tls::server_config(&config.server)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not match"), "{err}");
}
