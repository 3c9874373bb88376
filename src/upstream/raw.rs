//! An upstream's `result`, relayed as the text it came in.
//!
//! toolgate reads a result only at its top level (`resultType`,
//! `requestState`, `_meta`), so a tree of the whole result, built on every
//! call and serialised again for the agent, was wasted work. A result here
//! is its top-level members, each kept as its JSON text; what is below them
//! reaches the agent byte for byte. Cold paths that need the tree (the
//! catalog, `initialize`, rounds) ask for [`RawResult::value`].

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// An upstream's JSON-RPC `result`: an object's members (sorted by key, as
/// a tree's were; a key sent twice keeps its last value, as in a tree), or
/// any other JSON value whole.
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

/// Read in one pass: an object's members are split out as they are met.
impl<'de> serde::Deserialize<'de> for RawResult {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawResult;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<RawResult, A::Error> {
                let mut o = BTreeMap::new();
                while let Some((k, v)) = m.next_entry::<String, Box<RawValue>>()? {
                    o.insert(k, v);
                }
                Ok(RawResult::Object(o))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut s: A,
            ) -> Result<RawResult, A::Error> {
                let mut items: Vec<Box<RawValue>> = Vec::new();
                while let Some(v) = s.next_element()? {
                    items.push(v);
                }
                serde_json::value::to_raw_value(&items)
                    .map(RawResult::Other)
                    .map_err(serde::de::Error::custom)
            }
            fn visit_unit<E>(self) -> Result<RawResult, E> {
                Ok(RawResult::Other(RawValue::NULL.to_owned()))
            }
            fn visit_bool<E>(self, b: bool) -> Result<RawResult, E> {
                Ok(RawResult::Other(text(&Value::from(b))))
            }
            fn visit_i64<E>(self, n: i64) -> Result<RawResult, E> {
                Ok(RawResult::Other(text(&Value::from(n))))
            }
            fn visit_u64<E>(self, n: u64) -> Result<RawResult, E> {
                Ok(RawResult::Other(text(&Value::from(n))))
            }
            fn visit_f64<E>(self, n: f64) -> Result<RawResult, E> {
                Ok(RawResult::Other(text(&Value::from(n))))
            }
            fn visit_str<E>(self, s: &str) -> Result<RawResult, E> {
                Ok(RawResult::Other(text(&Value::from(s))))
            }
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

    #[test]
    fn a_key_sent_twice_keeps_its_last_value_as_in_a_tree() {
        let r = parse(r#"{"resultType":"input_required","resultType":"complete"}"#);
        assert_eq!(r.get_str("resultType").as_deref(), Some("complete"));
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"resultType":"complete"}"#
        );
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
