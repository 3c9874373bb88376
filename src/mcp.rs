//! JSON-RPC / MCP wire types, strict parsing and error codes. Pure: no IO.
//!
//! Invariants:
//! - every message is parsed exactly once, by [`parse_strict`], which refuses
//!   duplicate object keys at any depth, nesting deeper than [`MAX_DEPTH`],
//!   invalid UTF-8 and lone surrogates (serde_json refuses the last two);
//! - a [`Request`] only exists for a well-formed single JSON-RPC message:
//!   batches, non-object `params` and unknown envelope keys are refused;
//! - what is forwarded upstream is toolgate's own serialisation of the checked
//!   values, never the client's bytes.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Deepest nesting of arrays/objects accepted in any message.
pub const MAX_DEPTH: usize = 64;

/// Protocol revisions toolgate speaks, oldest first.
pub const V2025_06_18: &str = "2025-06-18";
pub const V2025_11_25: &str = "2025-11-25";
pub const V2026_07_28: &str = "2026-07-28";
/// Session-based revisions (initialize handshake, `Mcp-Session-Id`).
pub const SESSION_VERSIONS: [&str; 3] = ["2025-03-26", V2025_06_18, V2025_11_25];

/// Whether `v` names a revision toolgate speaks.
pub fn is_supported_version(v: &str) -> bool {
    v == V2026_07_28 || SESSION_VERSIONS.contains(&v)
}

/// JSON-RPC error codes used by toolgate (SPEC "Deciding a tools/call").
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL: i64 = -32603;
    pub const DENIED: i64 = -32003;
    pub const UPSTREAM: i64 = -32004;
    pub const AUDIT_UNAVAILABLE: i64 = -32005;
    pub const HOLD_PENDING: i64 = -32010;
    pub const HOLD_REFUSED: i64 = -32011;
    pub const RATE_LIMITED: i64 = -32029;
    /// 2026-07-28: an `Mcp-*` header disagrees with the body.
    pub const HEADER_MISMATCH: i64 = -32020;
    /// 2026-07-28: the requested revision is not supported.
    pub const UNSUPPORTED_VERSION: i64 = -32022;
}

/// MCP's HTTP header names, as constants: a name given as a string is
/// parsed (and lowercased) on every lookup or insert.
pub mod headers {
    use http::HeaderName;
    pub const MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");
    pub const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");
    pub const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
    pub const MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");
    pub const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");
}

/// 2026-07-28 request envelope keys in `params._meta`.
pub const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
pub const META_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
pub const META_CLIENT_INFO: &str = "io.modelcontextprotocol/clientInfo";
/// 2026-07-28 result key naming the server.
/// The id of the `subscriptions/listen` request a notification belongs to.
pub const META_SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";
pub const META_SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";

/// Decodes an `Mcp-Name`-style header value: plain, or `=?base64?...?=`
/// for values that are not printable ASCII.
pub fn decode_header_value(v: &str) -> Result<String, String> {
    use base64::Engine as _;
    match v
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| "header value is not valid base64 UTF-8".to_owned()),
        None => Ok(v.to_owned()),
    }
}

/// Encodes a value for an `Mcp-Name`-style header (inverse of
/// [`decode_header_value`]).
pub fn encode_header_value(v: &str) -> String {
    use base64::Engine as _;
    let plain = !v.is_empty()
        && v.bytes().all(|b| (0x20..0x7f).contains(&b))
        && v.trim() == v
        && !v.starts_with("=?");
    if plain {
        v.to_owned()
    } else {
        format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode(v)
        )
    }
}

/// Why a message was refused before any decision could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("duplicate key {key:?} at {pointer}")]
    DuplicateKey { key: String, pointer: String },
    #[error("nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("JSON-RPC batches are not accepted; send one message per request")]
    Batch,
    #[error("invalid JSON-RPC message: {0}")]
    Envelope(String),
}

impl ParseError {
    /// The JSON-RPC code for this refusal.
    pub fn code(&self) -> i64 {
        match self {
            ParseError::Json(_) | ParseError::DuplicateKey { .. } | ParseError::TooDeep => {
                code::PARSE_ERROR
            }
            ParseError::Batch | ParseError::Envelope(_) => code::INVALID_REQUEST,
        }
    }
}

/// Parses `bytes` as one JSON value, strictly (see module docs).
pub fn parse_strict(bytes: &[u8]) -> Result<Value, ParseError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let mut failure = None;
    let overflow = Overflow::new(bytes);
    let seed = StrictSeed {
        depth: 0,
        failure: &mut failure,
        path: &mut Vec::new(),
        numbers: &mut 0,
        overflow: &overflow,
    };
    let parsed = seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    match (parsed, failure) {
        (_, Some(f)) => Err(f),
        (Ok(v), None) => Ok(v),
        (Err(e), None) => Err(ParseError::Json(e.to_string())),
    }
}

struct StrictSeed<'a> {
    depth: usize,
    failure: &'a mut Option<ParseError>,
    path: &'a mut Vec<String>,
    /// Numbers visited so far, in document order.
    numbers: &'a mut usize,
    /// Which of them (by order) are integer literals beyond 64 bits.
    overflow: &'a Overflow<'a>,
}

/// The integer literals beyond 64 bits in a message, found on demand:
/// serde_json hands only those (and real floats) to `visit_f64`, so a
/// message without either never pays for the scan.
struct Overflow<'a> {
    bytes: &'a [u8],
    found: std::cell::OnceCell<Vec<usize>>,
}

impl<'a> Overflow<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Overflow {
            bytes,
            found: std::cell::OnceCell::new(),
        }
    }

    fn contains(&self, nth: usize) -> bool {
        self.found
            .get_or_init(|| overflowing_integers(self.bytes))
            .contains(&nth)
    }
}

/// The document-order indexes of the number literals in `bytes` that are
/// integers (no fraction, no exponent) fitting neither i64 nor u64.
/// serde_json would read them as the nearest f64, so a forwarded call would
/// carry another number than the agent sent: they are refused instead.
/// Almost every message has no digit run that long, and skips the scan.
fn overflowing_integers(bytes: &[u8]) -> Vec<usize> {
    let mut run = 0usize;
    let long_run = bytes.iter().any(|b| {
        run = if b.is_ascii_digit() { run + 1 } else { 0 };
        run >= 19
    });
    if !long_run {
        return Vec::new();
    }
    let (mut out, mut n, mut i) = (Vec::new(), 0usize, 0usize);
    let mut in_string = false;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                let lit = &bytes[start..i];
                let integral = !lit.iter().any(|c| matches!(c, b'.' | b'e' | b'E'));
                let fits = std::str::from_utf8(lit)
                    .is_ok_and(|t| t.parse::<i64>().is_ok() || t.parse::<u64>().is_ok());
                if integral && !fits {
                    out.push(n);
                }
                n += 1;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

impl<'de> DeserializeSeed<'de> for StrictSeed<'_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

fn pointer_of(path: &[String]) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    let mut p = String::new();
    for seg in path {
        p.push('/');
        p.push_str(&escape_segment(seg));
    }
    p
}

/// A JSON pointer reference token (RFC 6901: `~` as `~0`, `/` as `~1`).
fn escape_segment(seg: &str) -> String {
    seg.replace('~', "~0").replace('/', "~1")
}

/// `pointer` (as a [`ParseError::DuplicateKey`] gives it: `/` for the root)
/// seen from one level up, under `segment`.
pub(crate) fn pointer_under(segment: &str, pointer: &str) -> String {
    let seg = escape_segment(segment);
    match pointer {
        "/" => format!("/{seg}"),
        p => format!("/{seg}{p}"),
    }
}

impl<'de> Visitor<'de> for StrictSeed<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        *self.numbers += 1;
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        *self.numbers += 1;
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        let nth = *self.numbers;
        *self.numbers += 1;
        if self.overflow.contains(nth) {
            let at = pointer_of(self.path);
            *self.failure = Some(ParseError::Json(format!(
                "the integer at {at} does not fit in 64 bits (it would not reach the tool as sent)"
            )));
            return Err(E::custom("integer out of range"));
        }
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            *self.failure = Some(ParseError::TooDeep);
            return Err(de::Error::custom("too deep"));
        }
        let mut out = Vec::new();
        let mut i = 0usize;
        loop {
            self.path.push(i.to_string());
            let next = seq.next_element_seed(StrictSeed {
                depth: self.depth + 1,
                failure: self.failure,
                path: self.path,
                numbers: self.numbers,
                overflow: self.overflow,
            });
            self.path.pop();
            match next? {
                Some(v) => out.push(v),
                None => break,
            }
            i += 1;
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            *self.failure = Some(ParseError::TooDeep);
            return Err(de::Error::custom("too deep"));
        }
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                *self.failure = Some(ParseError::DuplicateKey {
                    pointer: pointer_of(self.path),
                    key,
                });
                return Err(de::Error::custom("duplicate key"));
            }
            self.path.push(key);
            let v = map.next_value_seed(StrictSeed {
                depth: self.depth + 1,
                failure: self.failure,
                path: self.path,
                numbers: self.numbers,
                overflow: self.overflow,
            });
            let key = self.path.pop().expect("pushed just above");
            out.insert(key, v?);
        }
        Ok(Value::Object(out))
    }
}

/// Checks JSON text found `depth` levels deep in a message as
/// [`parse_strict`] checks a message (duplicate keys at any depth, nesting
/// deeper than [`MAX_DEPTH`] in all), building nothing: for what toolgate
/// relays as text (an upstream's result). A duplicate key's pointer is
/// relative to `text`.
pub fn check_strict(text: &str, depth: usize) -> Result<(), ParseError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let mut failure = None;
    let checked = StrictCheck {
        depth,
        failure: &mut failure,
        keys: &mut Vec::new(),
    }
    .deserialize(&mut de)
    .and_then(|()| de.end());
    match (checked, failure) {
        (_, Some(f)) => Err(f),
        (Ok(()), None) => Ok(()),
        (Err(e), None) => Err(ParseError::Json(e.to_string())),
    }
}

/// [`StrictSeed`]'s checks without its tree.
struct StrictCheck<'a, 'de> {
    depth: usize,
    failure: &'a mut Option<ParseError>,
    /// The keys of the objects being read, outermost first (one list for
    /// all, so an object costs no allocation of its own).
    keys: &'a mut Vec<std::borrow::Cow<'de, str>>,
}

impl<'de> StrictCheck<'_, 'de> {
    fn child(&mut self) -> StrictCheck<'_, 'de> {
        StrictCheck {
            depth: self.depth + 1,
            failure: self.failure,
            keys: self.keys,
        }
    }

    /// Puts `segment` in front of a duplicate key's pointer (built on the
    /// way out, so the way in keeps no path).
    fn under(&mut self, segment: &str) {
        if let Some(ParseError::DuplicateKey { pointer, .. }) = self.failure {
            *pointer = pointer_under(segment, pointer);
        }
    }
}

impl<'de> DeserializeSeed<'de> for StrictCheck<'_, 'de> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// An object key, borrowed from the text when it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = std::borrow::Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Borrowed(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v.to_owned()))
    }
}

impl<'de> Visitor<'de> for StrictCheck<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            *self.failure = Some(ParseError::TooDeep);
            return Err(de::Error::custom("too deep"));
        }
        let mut i = 0usize;
        loop {
            match seq.next_element_seed(self.child()) {
                Ok(Some(())) => i += 1,
                Ok(None) => return Ok(()),
                Err(e) => {
                    self.under(&i.to_string());
                    return Err(e);
                }
            }
        }
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            *self.failure = Some(ParseError::TooDeep);
            return Err(de::Error::custom("too deep"));
        }
        // Most objects are small: their keys are compared in a list, and
        // only a large one's go in a set.
        const LIST: usize = 16;
        let base = self.keys.len();
        let mut set = std::collections::HashSet::new();
        while let Some(key) = map.next_key_seed(Key)? {
            let list = &self.keys[base..];
            let dup = if list.len() < LIST {
                list.contains(&key)
            } else {
                if set.is_empty() {
                    set.extend(list.iter().cloned());
                }
                set.contains(&key)
            };
            if dup {
                *self.failure = Some(ParseError::DuplicateKey {
                    pointer: "/".into(),
                    key: key.into_owned(),
                });
                return Err(de::Error::custom("duplicate key"));
            }
            if let Err(e) = map.next_value_seed(self.child()) {
                self.under(&key);
                return Err(e);
            }
            if self.keys.len() - base < LIST {
                self.keys.push(key);
            } else {
                set.insert(key);
            }
        }
        self.keys.truncate(base);
        Ok(())
    }
}

/// A JSON-RPC id: a string or an integer (null ids are refused).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Id {
    Num(i64),
    Str(String),
}

impl Id {
    pub fn to_value(&self) -> Value {
        match self {
            Id::Num(n) => Value::from(*n),
            Id::Str(s) => Value::String(s.clone()),
        }
    }
}

/// One checked JSON-RPC message from a client: a request (with `id`) or a
/// notification (without).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Option<Id>,
    pub method: String,
    /// Always an object (absent params become an empty object).
    pub params: Map<String, Value>,
}

/// A JSON-RPC response or a non-request message (the client answering a
/// server request, which toolgate does not issue yet).
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Request(Request),
    Response { id: Option<Id>, body: Value },
}

/// Parses and checks one JSON-RPC message strictly.
///
/// Requests are read in one pass ([`envelope_request`]); anything that pass
/// does not accept is read again as a tree and checked by
/// [`message_from_value`], which gives the answer (the same one: the fuzz
/// target `mcp_parse` compares the two on every input).
pub fn parse_message(bytes: &[u8]) -> Result<Message, ParseError> {
    if let Some(r) = envelope_request(bytes) {
        return Ok(Message::Request(r));
    }
    let v = parse_strict(bytes)?;
    message_from_value(v)
}

/// The common case of [`parse_message`] without a tree for the envelope: a
/// request whose members are `jsonrpc` ("2.0"), `method` (1-256 bytes),
/// optionally `id` (a string or an i64) and `params` (an object, read by
/// the same strict visitor as any value, at the same depth and number
/// count). Anything else, from an unknown member to a parse error anywhere,
/// is `None`: this only ever accepts what the general path accepts, as the
/// same [`Request`], and leaves every refusal (and its wording) to it.
fn envelope_request(bytes: &[u8]) -> Option<Request> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let overflow = Overflow::new(bytes);
    let mut failure = None;
    let visitor = Envelope {
        failure: &mut failure,
        overflow: &overflow,
    };
    let r = de::Deserializer::deserialize_map(&mut de, visitor).ok()?;
    de.end().ok()?;
    failure.is_none().then_some(r)
}

struct Envelope<'a> {
    failure: &'a mut Option<ParseError>,
    overflow: &'a Overflow<'a>,
}

/// A member of a request's envelope; any other key ends the one-pass read.
enum Member {
    Jsonrpc,
    Id,
    Method,
    Params,
}

impl<'de> de::Deserialize<'de> for Member {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Member;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an envelope member")
            }
            fn visit_str<E: de::Error>(self, k: &str) -> Result<Member, E> {
                match k {
                    "jsonrpc" => Ok(Member::Jsonrpc),
                    "id" => Ok(Member::Id),
                    "method" => Ok(Member::Method),
                    "params" => Ok(Member::Params),
                    _ => Err(E::custom("not a request member")),
                }
            }
        }
        d.deserialize_str(V)
    }
}

/// `"2.0"`, borrowed or unescaped; anything else is an error.
struct Version;

impl<'de> de::Deserialize<'de> for Version {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Version;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"2.0\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Version, E> {
                if v == "2.0" {
                    Ok(Version)
                } else {
                    Err(E::custom("not 2.0"))
                }
            }
        }
        d.deserialize_str(V)
    }
}

/// An id as [`message_from_value`] takes it: a string, or an integer that
/// fits i64. Counts a number, as the strict visitor does.
struct IdSeed<'a>(&'a mut usize);

impl<'de> DeserializeSeed<'de> for IdSeed<'_> {
    type Value = Id;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Id, D::Error> {
        d.deserialize_any(self)
    }
}

impl Visitor<'_> for IdSeed<'_> {
    type Value = Id;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string or an integer")
    }
    fn visit_i64<E>(self, v: i64) -> Result<Id, E> {
        *self.0 += 1;
        Ok(Id::Num(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Id, E> {
        *self.0 += 1;
        i64::try_from(v)
            .map(Id::Num)
            .map_err(|_| E::custom("id beyond i64"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Id, E> {
        Ok(Id::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Id, E> {
        Ok(Id::Str(v))
    }
}

impl<'de> Visitor<'de> for Envelope<'_> {
    type Value = Request;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON-RPC request")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Request, A::Error> {
        let dup = || de::Error::custom("duplicate member");
        let (mut version, mut id, mut method, mut params) = (false, None, None, None);
        let mut numbers = 0usize;
        while let Some(m) = map.next_key::<Member>()? {
            match m {
                Member::Jsonrpc if version => return Err(dup()),
                Member::Jsonrpc => {
                    map.next_value::<Version>()?;
                    version = true;
                }
                Member::Id if id.is_some() => return Err(dup()),
                Member::Id => id = Some(map.next_value_seed(IdSeed(&mut numbers))?),
                Member::Method if method.is_some() => return Err(dup()),
                Member::Method => {
                    let m: String = map.next_value()?;
                    if !method_ok(&m) {
                        return Err(de::Error::custom("bad method"));
                    }
                    method = Some(m);
                }
                Member::Params if params.is_some() => return Err(dup()),
                Member::Params => {
                    // The path only names where a refusal is, and no refusal
                    // leaves this pass (the general path gives it), so it
                    // starts empty rather than allocating "params" per call.
                    let v = map.next_value_seed(StrictSeed {
                        depth: 1,
                        failure: self.failure,
                        path: &mut Vec::new(),
                        numbers: &mut numbers,
                        overflow: self.overflow,
                    })?;
                    let Value::Object(p) = v else {
                        return Err(de::Error::custom("params not an object"));
                    };
                    params = Some(p);
                }
            }
        }
        match (version, method) {
            (true, Some(method)) => Ok(Request {
                id,
                method,
                params: params.unwrap_or_default(),
            }),
            _ => Err(de::Error::custom("incomplete envelope")),
        }
    }
}

/// A request's `method`: 1-256 bytes (both paths of [`parse_message`]).
fn method_ok(m: &str) -> bool {
    !m.is_empty() && m.len() <= 256
}

fn envelope(msg: impl Into<String>) -> ParseError {
    ParseError::Envelope(msg.into())
}

/// Checks the JSON-RPC envelope of an already strictly parsed value.
pub fn message_from_value(v: Value) -> Result<Message, ParseError> {
    let mut obj = match v {
        Value::Object(o) => o,
        Value::Array(_) => return Err(ParseError::Batch),
        _ => return Err(envelope("a message must be a JSON object")),
    };
    match obj.remove("jsonrpc") {
        Some(Value::String(s)) if s == "2.0" => {}
        _ => return Err(envelope("\"jsonrpc\" must be \"2.0\"")),
    }
    let id = match obj.remove("id") {
        None => None,
        Some(Value::String(s)) => Some(Id::Str(s)),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) => Some(Id::Num(i)),
            None => return Err(envelope("\"id\" must be a string or an integer")),
        },
        Some(_) => return Err(envelope("\"id\" must be a string or an integer")),
    };
    if obj.contains_key("result") || obj.contains_key("error") {
        if obj.contains_key("method") {
            return Err(envelope(
                "a message cannot be both a request and a response",
            ));
        }
        return Ok(Message::Response {
            id,
            body: Value::Object(obj),
        });
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) if method_ok(&m) => m,
        _ => return Err(envelope("\"method\" must be a non-empty string")),
    };
    let params = match obj.remove("params") {
        None => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => return Err(envelope("\"params\" must be an object")),
    };
    if let Some(k) = obj.keys().next() {
        return Err(envelope(format!("unknown member {k:?}")));
    }
    Ok(Message::Request(Request { id, method, params }))
}

/// The checked parameters of a `tools/call`.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// Always an object.
    pub arguments: Value,
    pub meta: Option<Map<String, Value>>,
    /// 2026-07-28 multi-round-trip retry: the answers to an
    /// `input_required` result's `inputRequests`, keyed as they were.
    pub input_responses: Option<Map<String, Value>>,
    /// 2026-07-28 multi-round-trip retry: the upstream's opaque state,
    /// echoed back unchanged.
    pub request_state: Option<String>,
}

impl ToolCall {
    /// Whether this call continues an `input_required` round.
    pub fn is_retry(&self) -> bool {
        self.input_responses.is_some() || self.request_state.is_some()
    }
}

/// Why `tools/call` params were refused (answered with -32602).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidParams(pub String, pub Shape);

/// What kind of mistake an [`InvalidParams`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A member that must be an object is not (`arguments`, `_meta`,
    /// `inputResponses`): refused like malformed JSON (SPEC: HTTP 400).
    NotAnObject,
    /// Anything else (a bad or missing `name`, an unknown member).
    Other,
}

/// The longest tool name toolgate accepts.
pub const MAX_NAME_LEN: usize = 256;

/// Checks `tools/call` params: exactly `name`, optional object `arguments`,
/// optional object `_meta`, and on a 2026-07-28 multi-round-trip retry an
/// object `inputResponses` and a string `requestState`; anything else
/// (including `Name`) is refused.
pub fn tool_call(mut params: Map<String, Value>) -> Result<ToolCall, InvalidParams> {
    for k in params.keys() {
        if !matches!(
            k.as_str(),
            "name" | "arguments" | "_meta" | "inputResponses" | "requestState"
        ) {
            return Err(InvalidParams(
                format!("unknown member {k:?} in tools/call params"),
                Shape::Other,
            ));
        }
    }
    let name = match params.remove("name") {
        Some(Value::String(s)) => s,
        _ => {
            return Err(InvalidParams(
                "\"name\" must be a string".into(),
                Shape::Other,
            ))
        }
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(InvalidParams(
            "\"name\" must be 1-256 characters without control characters".into(),
            Shape::Other,
        ));
    }
    // Members that must be objects when present.
    let mut object = |key: &str| match params.remove(key) {
        None => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(InvalidParams(
            format!("{key:?} must be an object"),
            Shape::NotAnObject,
        )),
    };
    let arguments = Value::Object(object("arguments")?.unwrap_or_default());
    let meta = object("_meta")?;
    let input_responses = object("inputResponses")?;
    let request_state = match params.remove("requestState") {
        None => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => {
            return Err(InvalidParams(
                "\"requestState\" must be a string".into(),
                Shape::Other,
            ))
        }
    };
    Ok(ToolCall {
        name,
        arguments,
        meta,
        input_responses,
        request_state,
    })
}

/// Removes the agent's capabilities that toolgate passes in `_meta` for
/// 2026-07-28 upstreams, for one that speaks a session-era revision (which
/// declared its client's capabilities at initialize); drops an emptied
/// `_meta`.
pub fn strip_capabilities(params: &mut Value) {
    let Value::Object(o) = params else {
        return;
    };
    let empty = match o.get_mut("_meta") {
        Some(Value::Object(m)) => m.remove(META_CAPABILITIES).is_some() && m.is_empty(),
        _ => false,
    };
    if empty {
        o.remove("_meta");
    }
}

/// The JSON-RPC message toolgate sends an upstream: `params` as the agent's
/// checked call left them, with `_meta` fitted to the upstream's revision
/// (2026-07-28: toolgate's envelope added; older: the 2026 capabilities
/// removed, as [`strip_capabilities`]), serialised straight from the
/// borrowed tree instead of a copy of it: this runs for every forwarded call.
pub fn upstream_message(
    id: Option<i64>,
    method: &str,
    params: Option<&Value>,
    modern: bool,
) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Msg<'a> {
        jsonrpc: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<i64>,
        method: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        params: Option<Outgoing<'a>>,
    }
    let msg = Msg {
        jsonrpc: "2.0",
        id,
        method,
        params: params.map(|p| Outgoing { params: p, modern }),
    };
    // Serialising a tree of valid values into memory cannot fail.
    serde_json::to_vec(&msg).unwrap_or_default()
}

/// `params` with `_meta` fitted to the upstream (see [`upstream_message`]).
struct Outgoing<'a> {
    params: &'a Value,
    modern: bool,
}

/// `_meta` for a 2026-07-28 upstream: the agent's keys, then toolgate's
/// envelope (revision and client info replace the agent's; capabilities
/// kept when the agent's call carries them).
struct ModernMeta<'a>(Option<&'a Map<String, Value>>);

impl serde::Serialize for ModernMeta<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        let mut has_capabilities = false;
        for (k, v) in self.0.into_iter().flatten() {
            match k.as_str() {
                META_VERSION | META_CLIENT_INFO => {}
                META_CAPABILITIES => {
                    has_capabilities = true;
                    m.serialize_entry(k, v)?;
                }
                _ => m.serialize_entry(k, v)?,
            }
        }
        m.serialize_entry(META_VERSION, V2026_07_28)?;
        if !has_capabilities {
            m.serialize_entry(META_CAPABILITIES, &Map::new())?;
        }
        m.serialize_entry(META_CLIENT_INFO, &TOOLGATE)?;
        m.end()
    }
}

/// `_meta` for a session-era upstream: the agent's keys but the 2026
/// capabilities.
struct SessionMeta<'a>(&'a Map<String, Value>);

impl serde::Serialize for SessionMeta<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        for (k, v) in self.0 {
            if k != META_CAPABILITIES {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
    }
}

impl serde::Serialize for Outgoing<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Value::Object(o) = self.params else {
            return self.params.serialize(s);
        };
        let meta = o.get("_meta");
        let mut m = s.serialize_map(None)?;
        for (k, v) in o {
            if k != "_meta" {
                m.serialize_entry(k, v)?;
            }
        }
        match (meta, self.modern) {
            // Not an object: passed as it came (the upstream judges it).
            (Some(v), _) if !v.is_object() => m.serialize_entry("_meta", v)?,
            (meta, true) => {
                m.serialize_entry("_meta", &ModernMeta(meta.and_then(Value::as_object)))?
            }
            (Some(Value::Object(meta)), false) => {
                let only_capabilities = meta.len() == 1 && meta.contains_key(META_CAPABILITIES);
                if !only_capabilities {
                    m.serialize_entry("_meta", &SessionMeta(meta))?;
                }
            }
            (_, false) => {}
        }
        m.end()
    }
}

/// toolgate as an MCP implementation (`serverInfo`, `clientInfo`).
#[derive(serde::Serialize)]
pub struct Implementation {
    pub name: &'static str,
    pub version: &'static str,
}

pub const TOOLGATE: Implementation = Implementation {
    name: "toolgate",
    version: env!("CARGO_PKG_VERSION"),
};

/// [`TOOLGATE`] as a JSON value.
pub fn toolgate_info() -> Value {
    serde_json::json!({"name": TOOLGATE.name, "version": TOOLGATE.version})
}

/// An object of `members`, moved in. (`json!` with a `Value` variable
/// copies it, member by member, through `to_value`.)
pub fn object<const N: usize>(members: [(&str, Value); N]) -> Value {
    Value::Object(
        members
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    )
}

/// Serialises a JSON-RPC success response.
pub fn result_response(id: &Id, result: Value) -> Value {
    object([
        ("jsonrpc", Value::from("2.0")),
        ("id", id.to_value()),
        ("result", result),
    ])
}

/// Serialises the response carrying `result` to request `id`, members in
/// the order [`result_response`]'s tree has them.
pub fn result_message(id: &Id, result: &impl serde::Serialize) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Message<'a, R> {
        id: Value,
        jsonrpc: &'static str,
        result: &'a R,
    }
    serde_json::to_vec(&Message {
        id: id.to_value(),
        jsonrpc: "2.0",
        result,
    })
    .unwrap_or_default()
}

/// Serialises a JSON-RPC error response (`id` null when it could not be read).
pub fn error_response(id: Option<&Id>, code: i64, message: &str, data: Option<Value>) -> Value {
    let mut err = Map::new();
    err.insert("code".into(), Value::from(code));
    err.insert("message".into(), Value::String(message.to_owned()));
    if let Some(d) = data {
        err.insert("data".into(), d);
    }
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id.map_or(Value::Null, Id::to_value),
        "error": Value::Object(err),
    })
}

/// Canonical JSON: object keys sorted, and
/// numbers spelled one way (an integral float such as `1.0` or `1e0` becomes
/// `1`), so that equal arguments hash equally however the client wrote them.
pub fn canonical_json(v: &Value) -> String {
    let mut out = Vec::with_capacity(128);
    write_canonical(v, &mut out);
    // Only JSON text (UTF-8) is ever written.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends the canonical JSON of `v` to `out` (see [`canonical_json`]),
/// without allocating per key or value: it runs for every audit record.
pub fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    use std::io::Write as _;
    match v {
        Value::Number(n) => {
            if n.is_f64() {
                let f = n.as_f64().unwrap_or(0.0);
                if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 {
                    let _ = write!(out, "{}", f as i64);
                    return;
                }
            }
            let _ = write!(out, "{n}");
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(x, out);
            }
            out.push(b']');
        }
        Value::Object(o) => {
            out.push(b'{');
            // serde_json's map iterates in key order unless a dependency
            // turns on `preserve_order`; sort only when it does not.
            if o.keys().is_sorted() {
                for (i, (k, x)) in o.iter().enumerate() {
                    write_entry(i, k, x, out);
                }
            } else {
                let mut entries: Vec<_> = o.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                for (i, (k, x)) in entries.into_iter().enumerate() {
                    write_entry(i, k, x, out);
                }
            }
            out.push(b'}');
        }
        Value::String(s) => write_str(s, out),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Null => out.extend_from_slice(b"null"),
    }
}

fn write_entry(i: usize, k: &str, x: &Value, out: &mut Vec<u8>) {
    if i > 0 {
        out.push(b',');
    }
    write_str(k, out);
    out.push(b':');
    write_canonical(x, out);
}

/// Appends `s` as a JSON string, escaped as serde_json escapes it.
pub fn write_str(s: &str, out: &mut Vec<u8>) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn general(b: &[u8]) -> Result<Message, ParseError> {
        parse_strict(b).and_then(message_from_value)
    }

    /// The one-pass read takes the usual requests, in any member order and
    /// spelling, and gives what the general path gives.
    #[test]
    fn requests_are_read_in_one_pass_as_the_general_path_reads_them() {
        let deep = format!("{}1{}", "[".repeat(62), "]".repeat(62));
        for m in [
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a__b","arguments":{"x":[1,2.5,-3]}}}"#.to_owned(),
            r#"{"params":{"name":"a"},"method":"tools/call","id":"x","jsonrpc":"2.0"}"#.to_owned(),
            r#" {"jsonrpc":"2\u002e0","\u006dethod":"ping","id":-9223372036854775808} "#.to_owned(),
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":9223372036854775807,"method":"m","params":{}}"#.to_owned(),
            format!(r#"{{"jsonrpc":"2.0","method":"{}","params":{{"a":{deep}}}}}"#, "m".repeat(256)),
        ] {
            let fast = envelope_request(m.as_bytes());
            assert!(fast.is_some(), "one pass: {m}");
            assert_eq!(Ok(Message::Request(fast.unwrap())), general(m.as_bytes()), "{m}");
        }
    }

    /// Everything else goes to the general path, whose answer (refusal,
    /// wording, JSON pointer) is the one given.
    #[test]
    fn anything_else_is_left_to_the_general_path() {
        let deep = format!("{}1{}", "[".repeat(63), "]".repeat(63));
        let big = "9".repeat(30);
        for m in [
            r#"{"jsonrpc":"2.0","id":1,"result":{}}"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"x"}}"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":1,"method":"m","result":{}}"#.to_owned(),
            r#"{"jsonrpc":"2.0","method":"m","extra":1}"#.to_owned(),
            r#"{"jsonrpc":"2.0","jsonrpc":"2.0","method":"m"}"#.to_owned(),
            r#"{"jsonrpc":"2.0","method":"m","method":"n"}"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"m"}"#.to_owned(),
            r#"{"jsonrpc":"2.0","method":"m","params":{},"params":{}}"#.to_owned(),
            r#"{"jsonrpc":"1.0","method":"m"}"#.to_owned(),
            r#"{"jsonrpc":2.0,"method":"m"}"#.to_owned(),
            r#"{"method":"m"}"#.to_owned(),
            r#"{"jsonrpc":"2.0"}"#.to_owned(),
            r#"{"jsonrpc":"2.0","method":""}"#.to_owned(),
            format!(r#"{{"jsonrpc":"2.0","method":"{}"}}"#, "m".repeat(257)),
            r#"{"jsonrpc":"2.0","method":7}"#.to_owned(),
            r#"{"jsonrpc":"2.0","method":"m","id":null}"#.to_owned(),
            r#"{"jsonrpc":"2.0","method":"m","id":1.5}"#.to_owned(),
            r#"{"jsonrpc":"2.0","method":"m","id":9223372036854775808}"#.to_owned(),
            format!(r#"{{"jsonrpc":"2.0","method":"m","id":{big}}}"#),
            format!(r#"{{"jsonrpc":"2.0","id":1,"method":"m","params":{{"a":{big}}}}}"#),
            format!(
                r#"{{"jsonrpc":"2.0","method":"m","params":{{"n":1,"a":[2.5,{big}]}},"id":3}}"#
            ),
            r#"{"jsonrpc":"2.0","method":"m","params":[]}"#.to_owned(),
            r#"{"jsonrpc":"2.0","method":"m","params":{"a":1,"a":2}}"#.to_owned(),
            format!(r#"{{"jsonrpc":"2.0","method":"m","params":{{"a":{deep}}}}}"#),
            r#"{"jsonrpc":"2.0","method":"m"} x"#.to_owned(),
            r#"{"jsonrpc":"2.0","method":"m""#.to_owned(),
            r#"{"jsonrpc":"2.0","method":"\ud800"}"#.to_owned(),
            r#"[{"jsonrpc":"2.0","method":"m"}]"#.to_owned(),
            r#""jsonrpc""#.to_owned(),
        ] {
            assert_eq!(envelope_request(m.as_bytes()), None, "general path: {m}");
            assert_eq!(parse_message(m.as_bytes()), general(m.as_bytes()), "{m}");
        }
    }

    /// What the upstream gets is what copying the params and fitting
    /// `_meta` in the tree gave (the way it was built before).
    #[test]
    fn upstream_messages_fit_meta_without_copying_the_params() {
        fn reference(id: Option<i64>, method: &str, params: Option<&Value>, modern: bool) -> Value {
            let mut msg = Map::new();
            msg.insert("jsonrpc".into(), Value::from("2.0"));
            if let Some(id) = id {
                msg.insert("id".into(), Value::from(id));
            }
            msg.insert("method".into(), Value::from(method));
            if let Some(p) = params {
                let mut p = p.clone();
                if !modern {
                    strip_capabilities(&mut p);
                } else if let Value::Object(o) = &mut p {
                    let meta = o.entry("_meta").or_insert_with(|| serde_json::json!({}));
                    if let Value::Object(m) = meta {
                        m.insert(META_VERSION.into(), Value::from(V2026_07_28));
                        m.entry(META_CAPABILITIES)
                            .or_insert_with(|| serde_json::json!({}));
                        m.insert(
                            META_CLIENT_INFO.into(),
                            serde_json::json!({"name": "toolgate", "version": env!("CARGO_PKG_VERSION")}),
                        );
                    }
                }
                msg.insert("params".into(), p);
            }
            Value::Object(msg)
        }
        let cases = [
            serde_json::json!({"name": "t", "arguments": {"a": [1, {"b": "c"}]}}),
            serde_json::json!({"name": "t", "arguments": {}, "_meta": {"progressToken": 7, "com.example/x": "y"}}),
            serde_json::json!({"name": "t", "_meta": {META_CAPABILITIES: {"sampling": {}}}}),
            serde_json::json!({"name": "t", "_meta": {META_CAPABILITIES: {}, "progressToken": "p", META_VERSION: "2025-11-25", META_CLIENT_INFO: {"name": "agent"}}}),
            serde_json::json!({"name": "t", "_meta": "not an object"}),
            serde_json::json!({"uri": "file:///x"}),
            serde_json::json!([1, 2]),
        ];
        for p in &cases {
            for modern in [true, false] {
                for id in [Some(3), None] {
                    let bytes = upstream_message(id, "tools/call", Some(p), modern);
                    let got: Value = serde_json::from_slice(&bytes).unwrap();
                    assert_eq!(
                        got,
                        reference(id, "tools/call", Some(p), modern),
                        "{p} modern={modern}"
                    );
                }
            }
        }
        let got: Value = serde_json::from_slice(&upstream_message(
            None,
            "notifications/initialized",
            None,
            false,
        ))
        .unwrap();
        assert_eq!(
            got,
            reference(None, "notifications/initialized", None, false)
        );
    }

    #[test]
    fn refuses_integers_beyond_64_bits_naming_the_pointer() {
        for lit in [
            "18446744073709551616",
            "-9223372036854775809",
            "123456789012345678901234567890",
        ] {
            let text = format!(r#"{{"a":"x\"1234567890123456789012","b":[1.5,{{"n":{lit}}}]}}"#);
            let e = parse_strict(text.as_bytes()).unwrap_err();
            assert!(
                matches!(&e, ParseError::Json(m) if m.contains("/b/1/n")),
                "{lit}: {e}"
            );
        }
        // What fits is read exactly; long digit runs in strings, floats and
        // exponents are not integers.
        let ok = br#"{"u":18446744073709551615,"i":-9223372036854775808,"s":"123456789012345678901234","f":1e30,"g":12345678901234567890.5}"#;
        let v = parse_strict(ok).unwrap();
        assert_eq!(v["u"].as_u64(), Some(u64::MAX));
        assert_eq!(v["i"].as_i64(), Some(i64::MIN));
        assert!(v["f"].is_f64() && v["g"].is_f64());
    }

    #[test]
    fn refuses_duplicate_keys_at_any_depth() {
        let e = parse_strict(br#"{"a":{"b":1,"b":2}}"#).unwrap_err();
        assert_eq!(
            e,
            ParseError::DuplicateKey {
                key: "b".into(),
                pointer: "/a".into()
            }
        );
        let e = parse_strict(br#"{"params":{"name":"x","name":"y"}}"#).unwrap_err();
        assert!(matches!(e, ParseError::DuplicateKey { ref key, .. } if key == "name"));
        let e = parse_strict(br#"[{"x":[{"k":1,"k":1}]}]"#).unwrap_err();
        assert_eq!(
            e,
            ParseError::DuplicateKey {
                key: "k".into(),
                pointer: "/0/x/0".into()
            }
        );
    }

    #[test]
    fn refuses_nesting_deeper_than_64() {
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(parse_strict(ok.as_bytes()).is_ok());
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert_eq!(parse_strict(deep.as_bytes()), Err(ParseError::TooDeep));
        let deep_obj = format!("{}1{}", r#"{"a":"#.repeat(200), "}".repeat(200));
        assert_eq!(parse_strict(deep_obj.as_bytes()), Err(ParseError::TooDeep));
    }

    #[test]
    fn refuses_invalid_utf8_lone_surrogates_and_trailing_bytes() {
        assert!(matches!(
            parse_strict(b"{\"a\":\"\xff\"}"),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            parse_strict(br#"{"a":"\ud800"}"#),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(
            parse_strict(br#"{"a":1} {"b":2}"#),
            Err(ParseError::Json(_))
        ));
        assert!(matches!(parse_strict(b"1e400"), Err(ParseError::Json(_))));
    }

    #[test]
    fn refuses_batches_and_bad_envelopes() {
        assert_eq!(
            parse_message(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#),
            Err(ParseError::Batch)
        );
        for bad in [
            r#"{"id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","params":[1]}"#,
            r#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","extra":true}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":""}"#,
            r#""ping""#,
        ] {
            assert!(
                matches!(parse_message(bad.as_bytes()), Err(ParseError::Envelope(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn reads_requests_and_notifications() {
        let m = parse_message(br#"{"jsonrpc":"2.0","id":"a","method":"tools/list"}"#).unwrap();
        assert_eq!(
            m,
            Message::Request(Request {
                id: Some(Id::Str("a".into())),
                method: "tools/list".into(),
                params: Map::new()
            })
        );
        let m =
            parse_message(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert!(matches!(m, Message::Request(Request { id: None, .. })));
    }

    #[test]
    fn tool_call_params_are_strict() {
        let p = |s: &str| match serde_json::from_str::<Value>(s).unwrap() {
            Value::Object(o) => o,
            _ => unreachable!(),
        };
        let c = tool_call(p(r#"{"name":"a__b","arguments":{"x":1}}"#)).unwrap();
        assert_eq!(c.name, "a__b");
        assert_eq!(c.arguments, serde_json::json!({"x":1}));
        assert_eq!(
            tool_call(p(r#"{"name":"a"}"#)).unwrap().arguments,
            serde_json::json!({})
        );
        for bad in [
            r#"{"Name":"a"}"#,
            r#"{"name":"a","arguments":[1]}"#,
            r#"{"name":"a","arguments":"x"}"#,
            r#"{"name":"a","arguments":null}"#,
            r#"{"name":""}"#,
            r#"{"name":"a\u0000b"}"#,
            r#"{"name":7}"#,
            r#"{"name":"a","_meta":3}"#,
        ] {
            assert!(tool_call(p(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn canonical_json_ignores_key_order_and_number_spelling() {
        let a = parse_strict(br#"{"b":1.0,"a":[1e0,{"y":2,"x":"s"}]}"#).unwrap();
        let b = parse_strict(br#"{"a":[1,{"x":"s","y":2.0}],"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), r#"{"a":[1,{"x":"s","y":2}],"b":1}"#);
        let c = parse_strict(br#"{"b":1.5}"#).unwrap();
        assert_ne!(canonical_json(&c), canonical_json(&b));
    }
}
