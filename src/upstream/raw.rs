//! An upstream's `result`, relayed as the text it came in.
//!
//! toolgate reads a result only at its top level (`resultType`,
//! `requestState`, `_meta`), so a tree of the whole result, built on every
//! call and serialised again for the agent, was wasted work. A result here
//! is its top-level members, each kept as its JSON text; what is below them
//! reaches the agent byte for byte. Cold paths that need the tree (the
//! catalog, `initialize`, rounds) ask for [`RawResult::value`].
//!
//! What is relayed as text is still checked as an agent's message is, while
//! it is read: no duplicate key at any depth, no nesting deeper than
//! [`mcp::MAX_DEPTH`] (counted from the response that carries the result),
//! else the result is refused ([`Checked`]). The check builds no tree.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::mcp::{self, ParseError};

/// An upstream's JSON-RPC `result`: an object's members (sorted by key, as
/// a tree's were), or any other JSON value whole.
#[derive(Debug, Clone)]
pub enum RawResult {
    Object(BTreeMap<String, Box<RawValue>>),
    Other(Box<RawValue>),
}

/// `v` as JSON text (a `Value` always serialises).
fn text(v: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

impl RawResult {
    /// A result toolgate made itself, or got as a tree.
    pub fn from_value(v: Value) -> RawResult {
        match v {
            Value::Object(o) => {
                RawResult::Object(o.into_iter().map(|(k, v)| (k, text(&v))).collect())
            }
            other => RawResult::Other(text(&other)),
        }
    }

    /// The whole result as a tree.
    pub fn value(&self) -> Value {
        serde_json::to_string(self)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null)
    }

    /// Top-level member `key`, as a tree.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.member(key)
            .and_then(|r| serde_json::from_str(r.get()).ok())
    }

    /// Top-level member `key` if it is a string.
    pub fn get_str(&self, key: &str) -> Option<String> {
        self.member(key)
            .and_then(|r| serde_json::from_str::<String>(r.get()).ok())
    }

    fn member(&self, key: &str) -> Option<&RawValue> {
        match self {
            RawResult::Object(o) => o.get(key).map(|r| &**r),
            RawResult::Other(_) => None,
        }
    }

    /// Sets top-level member `key` (a result that is no object is left as
    /// it is).
    pub fn insert(&mut self, key: &str, v: &Value) {
        self.insert_text(key, text(v));
    }

    /// Sets top-level member `key` to JSON text `v`.
    pub fn insert_text(&mut self, key: &str, v: Box<RawValue>) {
        if let RawResult::Object(o) = self {
            o.insert(key.to_owned(), v);
        }
    }

    /// Removes top-level member `key`.
    pub fn remove(&mut self, key: &str) {
        if let RawResult::Object(o) = self {
            o.remove(key);
        }
    }

    /// Whether top-level member `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.member(key).is_some()
    }
}

/// How deep a result's members are in the response carrying it (the
/// response is at depth 0, its `result` at 1).
const MEMBER_DEPTH: usize = 2;

/// A result as read, or why it is refused (a duplicate key, nesting too
/// deep): the refusal is kept, not raised, so the rest of the response
/// (its id) is still read, and the answer is known to be refused rather
/// than not an answer.
pub struct Checked(pub Result<RawResult, ParseError>);

/// Strict: a result [`Checked`] refuses is an error.
impl<'de> serde::Deserialize<'de> for RawResult {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Checked::deserialize(d)?
            .0
            .map_err(|e| serde::de::Error::custom(format!("the result: {e}")))
    }
}

/// Read in one pass: an object's members are split out as they are met,
/// and each is checked once as text.
impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Checked;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Checked, A::Error> {
                let mut o = BTreeMap::new();
                let mut refused = None;
                // After a refusal the members are still read (the
                // response goes on), not checked.
                while let Some((k, v)) = m.next_entry::<String, Box<RawValue>>()? {
                    if refused.is_some() {
                        continue;
                    }
                    if o.contains_key(&k) {
                        refused = Some(ParseError::DuplicateKey {
                            key: k,
                            pointer: "/".into(),
                        });
                        continue;
                    }
                    if let Err(e) = member(&v, &k) {
                        refused = Some(e);
                        continue;
                    }
                    o.insert(k, v);
                }
                Ok(Checked(match refused {
                    Some(e) => Err(e),
                    None => Ok(RawResult::Object(o)),
                }))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<Checked, A::Error> {
                let mut items: Vec<Box<RawValue>> = Vec::new();
                let mut refused = None;
                while let Some(v) = s.next_element::<Box<RawValue>>()? {
                    if refused.is_none() {
                        refused = member(&v, &items.len().to_string()).err();
                    }
                    items.push(v);
                }
                if let Some(e) = refused {
                    return Ok(Checked(Err(e)));
                }
                serde_json::value::to_raw_value(&items)
                    .map(|r| Checked(Ok(RawResult::Other(r))))
                    .map_err(serde::de::Error::custom)
            }
            fn visit_unit<E>(self) -> Result<Checked, E> {
                Ok(other(RawValue::NULL.to_owned()))
            }
            fn visit_bool<E>(self, b: bool) -> Result<Checked, E> {
                Ok(other(text(&Value::from(b))))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Checked, E> {
                Ok(other(text(&Value::from(n))))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Checked, E> {
                Ok(other(text(&Value::from(n))))
            }
            fn visit_f64<E>(self, n: f64) -> Result<Checked, E> {
                Ok(other(text(&Value::from(n))))
            }
            fn visit_str<E>(self, s: &str) -> Result<Checked, E> {
                Ok(other(text(&Value::from(s))))
            }
        }
        fn other(r: Box<RawValue>) -> Checked {
            Checked(Ok(RawResult::Other(r)))
        }
        /// Checks member `name` of the result; a duplicate key's pointer
        /// is given from the result.
        fn member(v: &RawValue, name: &str) -> Result<(), ParseError> {
            mcp::check_strict(v.get(), MEMBER_DEPTH).map_err(|e| match e {
                ParseError::DuplicateKey { key, pointer } => ParseError::DuplicateKey {
                    pointer: mcp::pointer_under(name, &pointer),
                    key,
                },
                e => e,
            })
        }
        d.deserialize_any(V)
    }
}

impl Serialize for RawResult {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            RawResult::Object(o) => o.serialize(s),
            RawResult::Other(r) => r.serialize(s),
        }
    }
}

/// Equal as JSON values (member order and spacing aside).
impl PartialEq for RawResult {
    fn eq(&self, other: &Self) -> bool {
        self.value() == other.value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(s: &str) -> RawResult {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn what_is_below_the_top_level_is_relayed_byte_for_byte() {
        // Spacing, member order, escapes and number spelling inside a
        // member are the upstream's; top-level members come out sorted.
        let r = parse(
            r#"{"structuredContent":{"z":1.50,"a":"\u00e9"} ,"content":[ {"type":"text","text":"x"} ]}"#,
        );
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"content":[ {"type":"text","text":"x"} ],"structuredContent":{"z":1.50,"a":"\u00e9"}}"#
        );
        assert_eq!(r.value()["structuredContent"]["a"], json!("é"));
    }

    #[test]
    fn top_level_members_are_read_and_edited() {
        let mut r = parse(r#"{"resultType":"input_required","requestState":"s\"1","n":2}"#);
        assert_eq!(r.get_str("resultType").as_deref(), Some("input_required"));
        assert_eq!(r.get_str("requestState").as_deref(), Some("s\"1"));
        assert_eq!(r.get_str("n"), None, "not a string");
        assert_eq!(r.get("n"), Some(json!(2)));
        r.remove("requestState");
        r.insert("_meta", &json!({"k": true}));
        assert!(r.contains("_meta") && !r.contains("requestState"));
        assert_eq!(
            r.value(),
            json!({"resultType":"input_required","n":2,"_meta":{"k":true}})
        );
    }

    fn refused(s: &str) -> String {
        match serde_json::from_str::<Checked>(s).unwrap().0 {
            Ok(r) => panic!("accepted {s}: {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_key_sent_twice_at_any_depth_is_refused() {
        assert_eq!(
            refused(r#"{"resultType":"input_required","resultType":"complete"}"#),
            r#"duplicate key "resultType" at /"#
        );
        assert_eq!(
            refused(r#"{"content":[{"type":"text","text":"benign","text":"evil"}]}"#),
            r#"duplicate key "text" at /content/0"#
        );
        assert_eq!(
            refused(r#"[1, {"a/b": {"k": 1, "k": 2}}]"#),
            r#"duplicate key "k" at /1/a~1b"#
        );
        // Escaped keys are compared as text, and large objects as small.
        assert!(refused(r#"{"x":{"\u0061":1,"a":2}}"#).contains(r#""a""#));
        let many: Vec<String> = (0..40).map(|i| format!(r#""k{i}":{i}"#)).collect();
        let big = format!(r#"{{"x":{{{},"k39":0}}}}"#, many.join(","));
        assert!(refused(&big).contains(r#""k39""#));
        assert!(serde_json::from_str::<RawResult>(&big).is_err());
        let fine = format!(r#"{{"x":{{{}}}}}"#, many.join(","));
        assert!(serde_json::from_str::<RawResult>(&fine).is_ok());
    }

    #[test]
    fn nesting_is_counted_from_the_response_and_bounded_as_an_agents() {
        // The response is depth 0, the result 1: 62 more levels reach the
        // 64 an agent may send; 63 do not.
        let nest = |n: usize| format!(r#"{{"a":{}1{}}}"#, "[".repeat(n), "]".repeat(n));
        assert!(serde_json::from_str::<RawResult>(&nest(62)).is_ok());
        assert_eq!(
            refused(&nest(63)),
            format!("nesting deeper than {} levels", mcp::MAX_DEPTH)
        );
        assert!(refused(&format!("[{}1{}]", "[".repeat(63), "]".repeat(63))).contains("deeper"));
        // A message of the same depth from an agent: the same line.
        let msg = |n: usize| format!(r#"{{"result":{}}}"#, nest(n));
        assert!(mcp::parse_strict(msg(62).as_bytes()).is_ok());
        assert!(mcp::parse_strict(msg(63).as_bytes()).is_err());
    }

    #[test]
    fn a_result_that_is_no_object_is_kept_whole() {
        for s in ["null", "[1, 2]", "\"x\"", "7", "true", "-1", "2.5"] {
            let mut r = parse(s);
            r.insert("_meta", &json!({}));
            assert_eq!(serde_json::to_string(&r).unwrap(), s.replace(", ", ","));
            assert_eq!(r.get("_meta"), None);
        }
        assert_eq!(
            RawResult::from_value(json!({"a": [1, {"b": null}]})).value(),
            json!({"a": [1, {"b": null}]})
        );
        assert_eq!(RawResult::from_value(Value::Null), parse("null"));
    }
}
