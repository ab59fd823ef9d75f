//! TLS for the ingest and exporter listeners: PEM files, ALPN h2, and optional client
//! certificates (mTLS) for Sora's exporter.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::config::ServerConfig;

#[derive(Debug, thiserror::Error)]
#[error("`{key}` ({}): {message}", path.display())]
pub struct TlsError {
    pub key: &'static str,
    pub path: PathBuf,
    pub message: String,
}

/// One crypto provider, chosen explicitly: with the AWS SDK compiled in, rustls would see two and
/// refuse to guess.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls configuration from `[server]`, or `None` when `https = false`.
pub fn server_config(server: &ServerConfig) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
    if !server.https {
        return Ok(None);
    }
    let (Some(chain_path), Some(key_path)) = (&server.tls_fullchain_file, &server.tls_privkey_file)
    else {
        // Config validation requires both; this only guards a programming error.
        return Err(TlsError {
            key: "server.tls_fullchain_file",
            path: PathBuf::new(),
            message: "https = true needs tls_fullchain_file and tls_privkey_file".into(),
        });
    };
    let chain = read_certificates("server.tls_fullchain_file", chain_path)?;
    let key = read_private_key(key_path)?;

    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| TlsError {
            key: "server.https",
            path: chain_path.clone(),
            message: err.to_string(),
        })?;
    let builder = match &server.tls_verify_cacert_path {
        Some(ca_path) => {
            let roots = read_ca_roots(ca_path)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|err| TlsError {
                    key: "server.tls_verify_cacert_path",
                    path: ca_path.clone(),
                    message: err.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|err| TlsError {
            key: "server.tls_privkey_file",
            path: key_path.clone(),
            message: format!("does not match the certificate in server.tls_fullchain_file: {err}"),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

fn open(key: &'static str, path: &Path) -> Result<BufReader<File>, TlsError> {
    File::open(path)
        .map(BufReader::new)
        .map_err(|err| TlsError {
            key,
            path: path.to_owned(),
            message: format!("cannot open: {err}"),
        })
}

fn read_certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates: Vec<_> = rustls_pemfile::certs(&mut open(key, path)?)
        .collect::<Result<_, _>>()
        .map_err(|err| TlsError {
            key,
            path: path.to_owned(),
            message: format!("invalid PEM: {err}"),
        })?;
    if certificates.is_empty() {
        return Err(TlsError {
            key,
            path: path.to_owned(),
            message: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certificates)
}

fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let key = "server.tls_privkey_file";
    rustls_pemfile::private_key(&mut open(key, path)?)
        .map_err(|err| TlsError {
            key,
            path: path.to_owned(),
            message: format!("invalid PEM: {err}"),
        })?
        .ok_or_else(|| TlsError {
            key,
            path: path.to_owned(),
            message: "no PRIVATE KEY block found (PKCS#8, PKCS#1 or SEC1)".into(),
        })
}

/// A CA file, or every `*.pem` / `*.crt` / `*.cer` file of a directory.
fn read_ca_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let key = "server.tls_verify_cacert_path";
    let files = if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|err| TlsError {
            key,
            path: path.to_owned(),
            message: format!("cannot list directory: {err}"),
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|file| {
                file.extension()
                    .and_then(|ext| ext.to_str())
                    .is_some_and(|ext| ["pem", "crt", "cer"].contains(&ext))
            })
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    let mut roots = RootCertStore::empty();
    for file in &files {
        for certificate in read_certificates(key, file)? {
            roots.add(certificate).map_err(|err| TlsError {
                key,
                path: file.clone(),
                message: format!("not a usable CA certificate: {err}"),
            })?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError {
            key,
            path: path.to_owned(),
            message:
                "no CA certificate found (expected a PEM file or a directory of *.pem/*.crt files)"
                    .into(),
        });
    }
    Ok(roots)
}
