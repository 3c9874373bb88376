//! JWT verification with every configured key kind, through the config
//! loader as a user would configure it, against real key files.

// Test helpers may unwrap: a panic there is a failed assertion.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use toolgate::config::Config;
use toolgate::identity::{agent_from_claims, now_unix, AuthError, Verifier};

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn verifier(keys_yaml: &str) -> Verifier {
    std::env::set_var("TG_JWT_TEST_SECRET", "jwt-test-secret-0123456789abcdef");
    let yaml = format!("auth:\n  agents:\n    issuer: iss\n    audience: aud\n    leeway: 5s\n    keys:\n{keys_yaml}");
    let c = Config::from_yaml(&fixtures().join("toolgate.yaml"), &yaml)
        .unwrap_or_else(|p| panic!("{p}"));
    Verifier::new(
        &c.agents.issuer,
        &c.agents.audience,
        c.agents.leeway,
        c.agents.keys.clone(),
    )
}

fn claims() -> Value {
    json!({"iss": "iss", "aud": "aud", "sub": "bot", "exp": now_unix() + 60})
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, c: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, c, key).unwrap()
}

fn rsa() -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(fixtures().join("rsa-private.pem")).unwrap()).unwrap()
}

fn ec() -> EncodingKey {
    EncodingKey::from_ec_pem(&std::fs::read(fixtures().join("ec-private.pem")).unwrap()).unwrap()
}

#[test]
fn rs256_and_es256_public_keys_verify_their_own_tokens_only() {
    let v = verifier("      - rs256: { public_key_pem: rsa-public.pem }\n      - es256: { public_key_pem: ec-public.pem }\n");
    let c = v
        .verify(&sign(Algorithm::RS256, None, &rsa(), &claims()))
        .unwrap();
    assert_eq!(agent_from_claims(&c, "sub").unwrap().agent.as_ref(), "bot");
    assert!(v
        .verify(&sign(Algorithm::ES256, None, &ec(), &claims()))
        .is_ok());
    // Signed by another RSA key (the EC key cannot sign RS256; tamper instead).
    let good = sign(Algorithm::RS256, None, &rsa(), &claims());
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    parts[1] = sign(
        Algorithm::RS256,
        None,
        &rsa(),
        &json!({"iss":"iss","aud":"aud","sub":"admin","exp": now_unix()+60}),
    )
    .split('.')
    .nth(1)
    .unwrap()
    .to_owned();
    assert_eq!(
        v.verify(&parts.join(".")),
        Err(AuthError::BadSignature),
        "payload swapped under a valid signature"
    );
}

#[test]
fn hs256_signed_with_the_rsa_public_key_is_refused() {
    // The classic confusion attack: the public key's bytes as an HMAC secret.
    let v = verifier("      - rs256: { public_key_pem: rsa-public.pem }\n");
    let pem = std::fs::read(fixtures().join("rsa-public.pem")).unwrap();
    let forged = sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(&pem),
        &claims(),
    );
    assert_eq!(v.verify(&forged), Err(AuthError::UnknownKey));
    // Even with both an HMAC key and an RSA key configured.
    let v = verifier("      - hs256: { secret_env: TG_JWT_TEST_SECRET }\n      - rs256: { public_key_pem: rsa-public.pem }\n");
    assert_eq!(v.verify(&forged), Err(AuthError::BadSignature));
}

#[test]
fn jwks_keys_are_selected_by_kid_and_never_fetched_from_headers() {
    let v = verifier("      - jwks: { path: jwks.json }\n");
    assert!(v
        .verify(&sign(Algorithm::RS256, Some("rsa-1"), &rsa(), &claims()))
        .is_ok());
    assert_eq!(
        v.verify(&sign(Algorithm::RS256, Some("other"), &rsa(), &claims())),
        Err(AuthError::UnknownKey)
    );
    // jku / jwk / x5u headers pointing elsewhere change nothing.
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    h.jku = Some("http://127.0.0.1:9/evil.json".into());
    h.x5u = Some("http://127.0.0.1:9/evil.pem".into());
    let t = jsonwebtoken::encode(&h, &claims(), &rsa()).unwrap();
    assert!(
        v.verify(&t).is_ok(),
        "ignored, and verified against the configured key"
    );
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("rsa-1".into());
    let t = jsonwebtoken::encode(&h, &claims(), &ec()).unwrap();
    assert_eq!(
        v.verify(&t),
        Err(AuthError::UnknownKey),
        "the kid's key fixes the algorithm"
    );
}

#[test]
fn leeway_and_not_before_are_honoured() {
    let v = verifier("      - es256: { public_key_pem: ec-public.pem }\n");
    let now = now_unix();
    let within = json!({"iss":"iss","aud":"aud","sub":"bot","exp": now - 2});
    assert!(
        v.verify(&sign(Algorithm::ES256, None, &ec(), &within))
            .is_ok(),
        "2s past exp is within 5s leeway"
    );
    let beyond = json!({"iss":"iss","aud":"aud","sub":"bot","exp": now - 10});
    assert_eq!(
        v.verify(&sign(Algorithm::ES256, None, &ec(), &beyond)),
        Err(AuthError::Expired)
    );
    let early = json!({"iss":"iss","aud":"aud","sub":"bot","exp": now + 60, "nbf": now + 60});
    assert_eq!(
        v.verify(&sign(Algorithm::ES256, None, &ec(), &early)),
        Err(AuthError::NotYetValid)
    );
}

#[test]
fn bad_key_files_are_config_errors_naming_the_key() {
    let dir = crate::support::temp_dir("not-a-key");
    let pem = dir.join("not-a-key.pem");
    std::fs::write(&pem, "hello").unwrap();
    let yaml = format!(
        "auth:\n  agents:\n    issuer: i\n    audience: a\n    keys:\n      - rs256: {{ public_key_pem: {} }}\n      - jwks: {{ path: missing.json }}\n",
        pem.display()
    );
    let e = Config::from_yaml(&fixtures().join("toolgate.yaml"), &yaml)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("auth.agents.keys[0]: rs256:") && e.contains("not a PEM public key"),
        "{e}"
    );
    assert!(e.contains("auth.agents.keys[1]: jwks: cannot read"), "{e}");
}
