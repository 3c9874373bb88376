//! JWT verification: a bearer token becomes a [`Caller`] (an agent) or an
//! [`Approver`] (the management plane), or an [`AuthError`].
//!
//! Invariants (SPEC "Hardening promises"):
//! - the algorithm is fixed by the configured key: a token whose header names
//!   another algorithm is refused, `none` never parses, and an HMAC secret is
//!   never derived from a public key;
//! - `kid` only selects among configured keys; `jku`, `jwk` and `x5u` headers
//!   are ignored;
//! - `exp`, `iss` and `aud` are required and checked, `nbf` is honoured,
//!   leeway is at most 30 s;
//! - tokens are never logged; errors say why without echoing the token.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

/// The longest bearer token accepted.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// One configured verification key.
pub struct KeyEntry {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
    /// The HMAC secret, kept so dev tokens can be minted (`toolgate token`).
    secret: Option<Vec<u8>>,
}

impl std::fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyEntry")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl KeyEntry {
    pub fn hmac(kid: Option<String>, secret: Vec<u8>) -> Self {
        KeyEntry {
            kid,
            alg: Algorithm::HS256,
            key: DecodingKey::from_secret(&secret),
            secret: Some(secret),
        }
    }
    pub fn public(kid: Option<String>, alg: Algorithm, key: DecodingKey) -> Self {
        KeyEntry {
            kid,
            alg,
            key,
            secret: None,
        }
    }
}

/// The configured keys of one plane.
#[derive(Debug, Default)]
pub struct KeySet {
    entries: Vec<KeyEntry>,
}

impl KeySet {
    pub fn new(entries: Vec<KeyEntry>) -> Self {
        KeySet { entries }
    }
    /// The first HMAC key, for minting dev tokens.
    pub fn hmac_key(&self) -> Option<(Option<&str>, &[u8])> {
        self.entries
            .iter()
            .find_map(|e| e.secret.as_deref().map(|s| (e.kid.as_deref(), s)))
    }
    /// Keys a token with this header may be checked against: same algorithm,
    /// and same `kid` when the token names one.
    fn candidates<'a>(&'a self, header: &'a Header) -> impl Iterator<Item = &'a KeyEntry> + 'a {
        self.entries.iter().filter(move |e| {
            e.alg == header.alg
                && match (&header.kid, &e.kid) {
                    (Some(want), Some(have)) => want == have,
                    (Some(_), None) => false,
                    (None, _) => true,
                }
        })
    }
}

/// Why a token was refused. The message is safe to show the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed Authorization header")]
    BadHeader,
    #[error("token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("no configured key matches the token's algorithm and kid")]
    UnknownKey,
    #[error("invalid signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("wrong audience")]
    WrongAudience,
    #[error("required claim {0:?} is missing or invalid")]
    Claim(String),
}

/// Verifies the tokens of one plane.
#[derive(Debug, Clone)]
pub struct Verifier {
    issuer: String,
    audience: String,
    leeway_s: u64,
    keys: Arc<KeySet>,
}

impl Verifier {
    pub fn new(
        issuer: &str,
        audience: &str,
        leeway: std::time::Duration,
        keys: Arc<KeySet>,
    ) -> Self {
        Verifier {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            leeway_s: leeway.as_secs().min(30),
            keys,
        }
    }

    /// Verifies `token` and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Map<String, Value>, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::TooLarge);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let mut last = AuthError::UnknownKey;
        for entry in self.keys.candidates(&header) {
            let mut v = Validation::new(entry.alg);
            v.leeway = self.leeway_s;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "iss", "aud"]);
            v.set_issuer(&[&self.issuer]);
            v.set_audience(&[&self.audience]);
            match jsonwebtoken::decode::<Map<String, Value>>(token.as_bytes(), &entry.key, &v) {
                Ok(data) => return Ok(data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::InvalidSignature => AuthError::BadSignature,
                        K::ExpiredSignature => AuthError::Expired,
                        K::ImmatureSignature => AuthError::NotYetValid,
                        K::InvalidIssuer => AuthError::WrongIssuer,
                        K::InvalidAudience => AuthError::WrongAudience,
                        K::MissingRequiredClaim(c) => AuthError::Claim(c.clone()),
                        _ => AuthError::Malformed,
                    };
                    // Only a bad signature means "try the next key"; any other
                    // failure was found with a key that verified the signature.
                    if last != AuthError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

/// Reads the bearer token from request headers. Exactly one `Authorization`
/// header with the `Bearer` scheme is accepted.
pub fn bearer(headers: &http::HeaderMap) -> Result<&str, AuthError> {
    let mut all = headers.get_all(http::header::AUTHORIZATION).iter();
    let first = all.next().ok_or(AuthError::Missing)?;
    if all.next().is_some() {
        return Err(AuthError::BadHeader);
    }
    let s = first.to_str().map_err(|_| AuthError::BadHeader)?;
    let (scheme, token) = s.split_once(' ').ok_or(AuthError::BadHeader)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::BadHeader);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    Ok(token)
}

/// An authenticated agent.
#[derive(Debug, Clone)]
pub struct Caller {
    pub agent: Arc<str>,
}

/// A bounded cache of verified agent tokens, so a signature is checked
/// once per token rather than once per call. An entry is used only while
/// `now < exp` (never longer than the token itself is valid) and holds only
/// the derived identity. Keys are whole token strings (no hash collisions).
/// The verifier's issuer, audience and keys are fixed for the process, so a
/// cached verdict cannot outlive the configuration that produced it.
pub struct TokenCache {
    map: dashmap::DashMap<Box<str>, (Arc<str>, u64)>,
    max: usize,
}

impl TokenCache {
    pub fn new(max: usize) -> Self {
        TokenCache {
            map: dashmap::DashMap::new(),
            max: max.max(1),
        }
    }

    /// The cached identity of `token`, if still valid at `now`.
    pub fn get(&self, token: &str, now: u64) -> Option<Caller> {
        let hit = self.map.get(token)?;
        let (agent, exp) = hit.value();
        (now < *exp).then(|| Caller {
            agent: agent.clone(),
        })
    }

    /// Remembers a verified token until `exp`. When full, expired entries
    /// are dropped first, then everything (a cache miss only costs a
    /// signature check).
    pub fn put(&self, token: &str, caller: &Caller, exp: u64, now: u64) {
        if exp <= now {
            return;
        }
        if self.map.len() >= self.max {
            self.map.retain(|_, (_, e)| *e > now);
            if self.map.len() >= self.max {
                self.map.clear();
            }
        }
        self.map
            .insert(Box::from(token), (caller.agent.clone(), exp));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Reads the agent identity from verified claims.
pub fn agent_from_claims(claims: &Map<String, Value>, claim: &str) -> Result<Caller, AuthError> {
    match claims.get(claim) {
        Some(Value::String(s))
            if !s.trim().is_empty() && s.len() <= 256 && !s.chars().any(char::is_control) =>
        {
            Ok(Caller {
                agent: Arc::from(s.as_str()),
            })
        }
        _ => Err(AuthError::Claim(claim.to_owned())),
    }
}

/// An authenticated human on the management plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approver {
    pub subject: String,
    pub roles: Vec<String>,
    pub amr: Vec<String>,
}

impl Approver {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// Reads an approver from verified claims.
pub fn approver_from_claims(
    claims: &Map<String, Value>,
    subject_claim: &str,
    roles_claim: &str,
) -> Result<Approver, AuthError> {
    let subject = match claims.get(subject_claim) {
        // Control characters are refused as for agents: a name that prints
        // like another must not pass for a different person.
        Some(Value::String(s))
            if !s.trim().is_empty() && s.len() <= 256 && !s.chars().any(char::is_control) =>
        {
            s.clone()
        }
        _ => return Err(AuthError::Claim(subject_claim.to_owned())),
    };
    Ok(Approver {
        subject,
        roles: strings(claims.get(roles_claim)),
        amr: strings(claims.get("amr")),
    })
}

/// Mints an HS256 token with `claims` (dev tokens; `toolgate token`).
pub fn mint_hs256(kid: Option<&str>, secret: &[u8], claims: &Value) -> Result<String, String> {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret))
        .map_err(|e| format!("cannot sign token: {e}"))
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier(entries: Vec<KeyEntry>) -> Verifier {
        Verifier::new(
            "iss",
            "aud",
            std::time::Duration::from_secs(0),
            Arc::new(KeySet::new(entries)),
        )
    }

    fn claims(extra: Value) -> Value {
        let mut c = json!({"iss":"iss","aud":"aud","sub":"bot","exp": now_unix() + 60});
        if let (Value::Object(c), Value::Object(e)) = (&mut c, extra) {
            c.extend(e);
        }
        c
    }

    fn hs(claims: &Value) -> String {
        mint_hs256(None, SECRET, claims).unwrap()
    }

    #[test]
    fn accepts_a_valid_hs256_token() {
        let v = verifier(vec![KeyEntry::hmac(None, SECRET.to_vec())]);
        let c = v.verify(&hs(&claims(json!({})))).unwrap();
        assert_eq!(agent_from_claims(&c, "sub").unwrap().agent.as_ref(), "bot");
    }

    #[test]
    fn refuses_expired_future_wrong_issuer_audience_and_missing_claims() {
        let v = verifier(vec![KeyEntry::hmac(None, SECRET.to_vec())]);
        let now = now_unix();
        let cases = [
            (json!({"exp": now - 5}), AuthError::Expired),
            (json!({"nbf": now + 120}), AuthError::NotYetValid),
            (json!({"iss": "other"}), AuthError::WrongIssuer),
            (json!({"aud": "other"}), AuthError::WrongAudience),
        ];
        for (extra, want) in cases {
            assert_eq!(v.verify(&hs(&claims(extra.clone()))), Err(want), "{extra}");
        }
        for missing in ["exp", "iss", "aud"] {
            let mut c = claims(json!({}));
            c.as_object_mut().unwrap().remove(missing);
            assert!(v.verify(&hs(&c)).is_err(), "{missing}");
        }
        let c = v.verify(&hs(&claims(json!({"sub": ""})))).unwrap();
        assert!(agent_from_claims(&c, "sub").is_err());
        let c = v.verify(&hs(&claims(json!({"sub": 7})))).unwrap();
        assert!(agent_from_claims(&c, "sub").is_err());
    }

    #[test]
    fn refuses_wrong_key_alg_none_and_garbage() {
        let v = verifier(vec![KeyEntry::hmac(None, SECRET.to_vec())]);
        let other = mint_hs256(
            None,
            b"another-secret-another-secret-xx",
            &claims(json!({})),
        )
        .unwrap();
        assert_eq!(v.verify(&other), Err(AuthError::BadSignature));
        // alg none: header {"alg":"none","typ":"JWT"}
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(claims(json!({})).to_string())
        );
        assert_eq!(v.verify(&none), Err(AuthError::Malformed));
        assert_eq!(v.verify("not.a.jwt"), Err(AuthError::Malformed));
        assert_eq!(
            v.verify(&"a".repeat(MAX_TOKEN_LEN + 1)),
            Err(AuthError::TooLarge)
        );
    }

    #[test]
    fn kid_only_selects_configured_keys() {
        let v = verifier(vec![KeyEntry::hmac(Some("k1".into()), SECRET.to_vec())]);
        let good = mint_hs256(Some("k1"), SECRET, &claims(json!({}))).unwrap();
        assert!(v.verify(&good).is_ok());
        let injected = mint_hs256(Some("../../etc/passwd"), SECRET, &claims(json!({}))).unwrap();
        assert_eq!(v.verify(&injected), Err(AuthError::UnknownKey));
    }

    #[test]
    fn the_token_cache_never_outlives_the_token_and_is_bounded() {
        let c = TokenCache::new(2);
        let bot = Caller {
            agent: Arc::from("bot"),
        };
        c.put("t1", &bot, 100, 10);
        assert_eq!(c.get("t1", 99).map(|c| c.agent), Some(Arc::from("bot")));
        assert!(c.get("t1", 100).is_none(), "expired at exp");
        assert!(c.get("t2", 50).is_none());
        c.put("t2", &bot, 100, 10);
        c.put("t3", &bot, 100, 10);
        assert!(c.len() <= 2);
        c.put("old", &bot, 5, 10);
        assert!(
            c.get("old", 10).is_none(),
            "an expired token is never cached"
        );
    }

    #[test]
    fn bearer_header_rules() {
        let mut h = http::HeaderMap::new();
        assert_eq!(bearer(&h), Err(AuthError::Missing));
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Ok("abc"));
        h.append("authorization", "Bearer def".parse().unwrap());
        assert_eq!(bearer(&h), Err(AuthError::BadHeader));
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), Err(AuthError::BadHeader));
    }

    #[test]
    fn approver_roles_and_amr_accept_strings_or_arrays() {
        let c = json!({"sub":"alice","roles":["approver"],"amr":"pwd mfa"});
        let a = approver_from_claims(c.as_object().unwrap(), "sub", "roles").unwrap();
        assert!(a.has_role("approver"));
        assert_eq!(a.amr, vec!["pwd", "mfa"]);
    }

    #[test]
    fn approver_subjects_with_control_characters_are_refused_like_agents() {
        for sub in [
            "ops-bot\n",
            "ops-bot\r",
            "ops-bot\t",
            "\u{0}alice",
            "al\u{7f}ice",
            "bob\u{85}",
        ] {
            let c = json!({"sub": sub, "roles": ["approver"]});
            assert_eq!(
                approver_from_claims(c.as_object().unwrap(), "sub", "roles"),
                Err(AuthError::Claim("sub".into())),
                "{sub:?}"
            );
            assert!(agent_from_claims(c.as_object().unwrap(), "sub").is_err());
        }
        let c = json!({"sub": "alice smith", "roles": ["approver"]});
        assert!(approver_from_claims(c.as_object().unwrap(), "sub", "roles").is_ok());
    }
}
