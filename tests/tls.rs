//! `https` upstreams on real TLS over loopback: the server's certificate is
//! verified against the configured CA, HTTP/2 is used when the server offers
//! it, mutual TLS presents the configured client certificate, and every
//! failure to establish trust fails closed (-32004, nothing delivered).

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use toolgate::demo::ToolServer;

use crate::support::{temp_dir, Harness, Opts};

/// A certificate authority that issues certificates for loopback.
pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    /// A leaf certificate for `localhost` and 127.0.0.1, and its key.
    pub(crate) fn issue(
        &self,
    ) -> (
        CertificateDer<'static>,
        PrivateKeyDer<'static>,
        String,
        String,
    ) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (cert.der().clone(), der, cert.pem(), key.serialize_pem())
    }

    pub(crate) fn write_pem(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, self.issuer.pem()).unwrap();
        p
    }
}

/// An MCP tool server behind TLS, offering `alpn`; with `client_ca`, it
/// requires a client certificate issued by that CA.
async fn tls_tools(ca: &Ca, alpn: &[&[u8]], client_ca: Option<&Ca>) -> (ToolServer, u16) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(c) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(c.issuer.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let (cert, key, _, _) = ca.issue();
    let mut config = builder.with_single_cert(vec![cert], key).unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tools = ToolServer::default();
    let served = tools.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let served = served.clone();
            tokio::spawn(async move {
                // A refused handshake is the outcome some tests expect.
                if let Ok(tls) = acceptor.accept(tcp).await {
                    served.serve_io(tls).await;
                }
            });
        }
    });
    (tools, port)
}

async fn harness(dir: &Path, upstreams: String) -> Harness {
    Harness::with(Opts {
        dir: Some(dir.to_path_buf()),
        upstreams: Some(upstreams),
        ..Opts::default()
    })
    .await
}

async fn get_invoice(h: &Harness) -> Value {
    let t = h.token("billing-bot");
    h.call(
        &t,
        "billing__get_invoice",
        json!({"invoice_id": "INV-000001"}),
    )
    .await
}

fn upstream(port: u16, tls: &str) -> String {
    format!(
        "upstreams:\n  - name: billing\n    url: https://localhost:{port}/mcp\n    headers: {{ X-Upstream-Key: \"k=${{env:TG_TEST_UPSTREAM_KEY}}\" }}\n    tls: {{ {tls} }}"
    )
}

#[tokio::test]
async fn calls_reach_an_https_upstream_over_http2_when_it_offers_it() {
    let dir = temp_dir("tls-h2");
    let ca = Ca::new("toolgate test CA");
    let ca_file = ca.write_pem(&dir, "ca.pem");
    let (tools, port) = tls_tools(&ca, &[b"h2", b"http/1.1"], None).await;
    let h = harness(&dir, upstream(port, "ca_file: ca.pem")).await;
    assert!(ca_file.exists());
    for _ in 0..3 {
        let v = get_invoice(&h).await;
        assert_eq!(
            v["result"]["structuredContent"]["invoice_id"], "INV-000001",
            "{v}"
        );
    }
    let got = tools.received();
    assert_eq!(got.len(), 3);
    assert!(
        got.iter().all(|r| r.version == http::Version::HTTP_2),
        "{:?}",
        got.iter().map(|r| r.version).collect::<Vec<_>>()
    );
    assert!(got[0].headers.get("authorization").is_none());
    assert_eq!(got[0].headers["x-upstream-key"], "k=upstream-credential");
}

#[tokio::test]
async fn an_https_upstream_offering_only_http1_is_spoken_to_in_http1() {
    let dir = temp_dir("tls-h1");
    let ca = Ca::new("toolgate test CA");
    ca.write_pem(&dir, "ca.pem");
    let (tools, port) = tls_tools(&ca, &[b"http/1.1"], None).await;
    let h = harness(&dir, upstream(port, "ca_file: ca.pem")).await;
    let v = get_invoice(&h).await;
    assert_eq!(v["result"]["structuredContent"]["invoice_id"], "INV-000001");
    assert_eq!(tools.received()[0].version, http::Version::HTTP_11);
}

#[tokio::test]
async fn a_certificate_from_a_ca_not_trusted_fails_closed() {
    let dir = temp_dir("tls-untrusted");
    let ca = Ca::new("the upstream's CA");
    let other = Ca::new("some other CA");
    other.write_pem(&dir, "ca.pem");
    let (tools, port) = tls_tools(&ca, &[b"h2", b"http/1.1"], None).await;
    let h = harness(&dir, upstream(port, "ca_file: ca.pem")).await;
    let v = get_invoice(&h).await;
    assert_eq!(v["error"]["code"], -32004, "{v}");
    assert!(
        tools.received().is_empty(),
        "a call crossed an unverified TLS link"
    );
    let audit = h.audit().await;
    let last = audit.last().unwrap();
    assert_eq!(last["decision"], "error", "{last}");
}

#[tokio::test]
async fn mutual_tls_presents_the_configured_client_certificate() {
    let dir = temp_dir("tls-mtls");
    let ca = Ca::new("toolgate test CA");
    ca.write_pem(&dir, "ca.pem");
    let clients = Ca::new("client CA");
    let (_, _, cert_pem, key_pem) = clients.issue();
    std::fs::write(dir.join("client.pem"), cert_pem).unwrap();
    std::fs::write(dir.join("client.key"), key_pem).unwrap();
    let (tools, port) = tls_tools(&ca, &[b"h2", b"http/1.1"], Some(&clients)).await;

    // Without a client certificate the server refuses the handshake.
    let without = harness(&dir, upstream(port, "ca_file: ca.pem")).await;
    let v = get_invoice(&without).await;
    assert_eq!(v["error"]["code"], -32004, "{v}");
    assert!(tools.received().is_empty());
    drop(without);

    let dir2 = temp_dir("tls-mtls-2");
    for f in ["client.pem", "client.key"] {
        std::fs::copy(dir.join(f), dir2.join(f)).unwrap();
    }
    ca.write_pem(&dir2, "ca.pem");
    let with = harness(
        &dir2,
        upstream(
            port,
            "ca_file: ca.pem, cert_file: client.pem, key_file: client.key",
        ),
    )
    .await;
    let v = get_invoice(&with).await;
    assert_eq!(
        v["result"]["structuredContent"]["invoice_id"], "INV-000001",
        "{v}"
    );
    assert_eq!(tools.received().len(), 1);
}
