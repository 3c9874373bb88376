//! TLS towards tool servers and webhooks: which certificate authorities are
//! trusted, and the client certificate for mutual TLS.
//!
//! Invariants: a server's certificate is always verified (there is no switch
//! to turn verification off); an upstream given its own `ca_file` trusts that
//! bundle only, not the system's roots as well; ALPN offers `h2` and
//! `http/1.1`, so an upstream that offers HTTP/2 gets it. Files are read once,
//! when the config loads, so a bad file is a config problem, never a failed
//! call.
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// Which setting a [`TlsError`] is about, to name it in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsField {
    CaFile,
    CertFile,
    KeyFile,
}

/// A TLS setting that cannot be used, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct TlsError {
    pub field: TlsField,
    pub message: String,
}

fn err(field: TlsField, message: impl Into<String>) -> TlsError {
    TlsError {
        field,
        message: message.into(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The system's trusted roots, read once per process (the store is a few
/// hundred files; a server starts several clients).
pub fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            // Unreadable or unparsable files in the store are skipped, as
            // every TLS client does; an empty store is reported by
            // `config` for the upstreams that would need it.
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            Arc::new(roots)
        })
        .clone()
}

/// A client config trusting `roots`, with an optional client identity.
fn build(
    roots: Arc<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(TlsField::CertFile, e.to_string()))?
        .with_root_certificates(roots);
    match identity {
        None => Ok(builder.with_no_client_auth()),
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
            err(
                TlsField::KeyFile,
                format!("the key does not fit the certificate: {e}"),
            )
        }),
    }
}

/// The config of clients with no TLS settings of their own: the system's
/// roots, no client certificate.
pub fn default_config() -> ClientConfig {
    static CONFIG: OnceLock<ClientConfig> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            build(system_roots(), None).expect("the ring provider supports the default versions")
        })
        .clone()
}

/// Reads every certificate in the PEM file at `path`.
fn certificates(path: &Path, field: TlsField) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(field, format!("cannot read {}: {e}", path.display())))?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(field, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(err(
            field,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(certs)
}

/// A client config for one upstream: `ca_file` (PEM; the only roots trusted)
/// or else the system's roots, and `identity` (certificate chain and private
/// key files, PEM) for mutual TLS.
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsError> {
    let roots = match ca_file {
        None => system_roots(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(path, TlsField::CaFile)? {
                roots.add(cert).map_err(|e| {
                    err(
                        TlsField::CaFile,
                        format!("{}: not a CA certificate: {e}", path.display()),
                    )
                })?;
            }
            Arc::new(roots)
        }
    };
    let identity = match identity {
        None => None,
        Some((cert, key)) => {
            let chain = certificates(cert, TlsField::CertFile)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                err(
                    TlsField::KeyFile,
                    format!("{}: no usable private key: {e}", key.display()),
                )
            })?;
            Some((chain, key))
        }
    };
    build(roots, identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("temp file");
        p
    }

    fn temp() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("toolgate-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_naming_the_file() {
        let d = temp();
        let p = write(&d, "ca.pem", "not a certificate\n");
        let e = client_config(Some(&p), None).unwrap_err();
        assert_eq!(e.field, TlsField::CaFile);
        assert!(e.message.contains("holds no PEM certificate"), "{e}");
        assert!(e.message.contains("ca.pem"), "{e}");
        let missing = d.join("absent.pem");
        let e = client_config(Some(&missing), None).unwrap_err();
        assert!(e.message.starts_with("cannot read"), "{e}");
    }

    #[test]
    fn a_client_key_that_does_not_fit_its_certificate_is_refused() {
        let d = temp();
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).expect("cert");
        let other = rcgen::KeyPair::generate().expect("key");
        let cert = write(&d, "client.pem", &ca.cert.pem());
        let key = write(&d, "client.key", &other.serialize_pem());
        let e = client_config(None, Some((&cert, &key))).unwrap_err();
        assert_eq!(e.field, TlsField::KeyFile);
        let good = write(&d, "good.key", &ca.signing_key.serialize_pem());
        assert!(client_config(None, Some((&cert, &good))).is_ok());
        let e = client_config(None, Some((&cert, &cert))).unwrap_err();
        assert_eq!(e.field, TlsField::KeyFile);
        assert!(e.message.contains("no usable private key"), "{e}");
    }

    #[test]
    fn alpn_is_left_to_the_connector() {
        // hyper-rustls sets ALPN itself and refuses a config that has it.
        assert!(default_config().alpn_protocols.is_empty());
        let d = temp();
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).expect("cert");
        let p = write(&d, "ca.pem", &ca.cert.pem());
        let c = client_config(Some(&p), None).expect("config");
        assert!(c.alpn_protocols.is_empty());
    }
}
