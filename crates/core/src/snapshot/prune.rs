//! Reading only the fields portpolicy uses: a serde adapter that hides every field a [`Keep`]
//! does not name, so a typed object deserialized through it holds those fields alone. What is
//! hidden is skipped by the reader without being built (and cannot fail to parse), which is
//! what keeps a loaded snapshot's memory to what portpolicy reads, whatever the dump carries
//! (managed fields, last-applied annotations, statuses, container specs).

use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IgnoredAny, IntoDeserializer, MapAccess, SeqAccess,
    Visitor,
};

/// Which part of a node to keep.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Keep {
    /// All of it.
    All,
    /// Of a mapping, only these fields, each kept as its rule says.
    Fields(&'static [(&'static str, Keep)]),
    /// Of a sequence, every item, each kept as the rule says.
    Items(&'static Keep),
    /// Of a mapping of strings, only these keys (the annotations portpolicy reads).
    Keys(&'static [&'static str]),
}

impl Keep {
    /// The rule for a mapping's field `key`; `None` when it is not kept.
    fn field(&self, key: &str) -> Option<&'static Keep> {
        match self {
            Keep::Fields(fields) => fields.iter().find(|(name, _)| *name == key).map(|(_, keep)| keep),
            Keep::Keys(keys) => keys.contains(&key).then_some(&Keep::All),
            // A rule for another shape: the reader of the object says what is wrong with it.
            Keep::All | Keep::Items(_) => Some(&Keep::All),
        }
    }

    fn item(&self) -> &'static Keep {
        match self {
            Keep::Items(keep) => keep,
            _ => &Keep::All,
        }
    }

    /// Whether the field at `path` (mapping keys; sequence indexes are skipped) is kept.
    #[cfg(test)]
    pub(crate) fn keeps<'a>(&self, path: impl IntoIterator<Item = PathStep<'a>>) -> bool {
        let mut rule = self;
        for step in path {
            rule = match (rule, step) {
                (Keep::All, _) => return true,
                (rule, PathStep::Key(key)) => match rule.field(key) {
                    Some(next) => next,
                    None => return false,
                },
                (rule, PathStep::Index) => rule.item(),
            };
        }
        true
    }
}

/// One step of a field path.
#[cfg(test)]
#[derive(Clone, Copy, Debug)]
pub(crate) enum PathStep<'a> {
    Key(&'a str),
    Index,
}

/// A deserializer that shows `inner` through `keep`.
pub(crate) struct Pruned<D> {
    inner: D,
    keep: &'static Keep,
}

impl<D> Pruned<D> {
    pub(crate) fn new(inner: D, keep: &'static Keep) -> Self {
        Pruned { inner, keep }
    }
}

macro_rules! forward_pruned {
    ($($method:ident $(($($arg:ident: $ty:ty),*))?),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, $($($arg: $ty,)*)? visitor: V) -> Result<V::Value, D::Error> {
                if *self.keep == Keep::All {
                    return self.inner.$method($($($arg,)*)? visitor);
                }
                self.inner.$method($($($arg,)*)? PrunedVisitor { inner: visitor, keep: self.keep })
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Pruned<D> {
    type Error = D::Error;

    forward_pruned! {
        deserialize_any, deserialize_bool, deserialize_i8, deserialize_i16, deserialize_i32,
        deserialize_i64, deserialize_i128, deserialize_u8, deserialize_u16, deserialize_u32,
        deserialize_u64, deserialize_u128, deserialize_f32, deserialize_f64, deserialize_char,
        deserialize_str, deserialize_string, deserialize_bytes, deserialize_byte_buf,
        deserialize_option, deserialize_unit, deserialize_seq, deserialize_map,
        deserialize_identifier, deserialize_ignored_any,
        deserialize_unit_struct(name: &'static str),
        deserialize_newtype_struct(name: &'static str),
        deserialize_tuple(len: usize),
        deserialize_tuple_struct(name: &'static str, len: usize),
        deserialize_struct(name: &'static str, fields: &'static [&'static str]),
        deserialize_enum(name: &'static str, variants: &'static [&'static str]),
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

struct PrunedVisitor<V> {
    inner: V,
    keep: &'static Keep,
}

macro_rules! forward_visit {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(
            fn $method<E: de::Error>(self, v: $ty) -> Result<Self::Value, E> {
                self.inner.$method(v)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for PrunedVisitor<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    forward_visit! {
        visit_bool(bool), visit_i8(i8), visit_i16(i16), visit_i32(i32), visit_i64(i64),
        visit_i128(i128), visit_u8(u8), visit_u16(u16), visit_u32(u32), visit_u64(u64),
        visit_u128(u128), visit_f32(f32), visit_f64(f64), visit_char(char), visit_str(&str),
        visit_borrowed_str(&'de str), visit_string(String), visit_bytes(&[u8]),
        visit_borrowed_bytes(&'de [u8]), visit_byte_buf(Vec<u8>),
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.inner.visit_some(Pruned::new(d, self.keep))
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.inner.visit_newtype_struct(Pruned::new(d, self.keep))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_seq(PrunedSeq {
            inner: seq,
            keep: self.keep.item(),
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_map(PrunedMap {
            inner: map,
            keep: self.keep,
            value: &Keep::All,
        })
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_enum(data)
    }
}

struct PrunedSeed<S> {
    inner: S,
    keep: &'static Keep,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for PrunedSeed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(Pruned::new(d, self.keep))
    }
}

struct PrunedSeq<A> {
    inner: A,
    keep: &'static Keep,
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for PrunedSeq<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, A::Error> {
        self.inner.next_element_seed(PrunedSeed {
            inner: seed,
            keep: self.keep,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

struct PrunedMap<A> {
    inner: A,
    keep: &'static Keep,
    /// The rule for the value of the key just handed out.
    value: &'static Keep,
}

/// A mapping key as the reader gives it, borrowed when it can be.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key::Owned(v))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for PrunedMap<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        loop {
            let Some(key) = self.inner.next_key::<Key<'de>>()? else {
                return Ok(None);
            };
            let text = match &key {
                Key::Borrowed(k) => *k,
                Key::Owned(k) => k.as_str(),
            };
            match self.keep.field(text) {
                Some(rule) => {
                    self.value = rule;
                    return match key {
                        Key::Borrowed(k) => seed.deserialize(de::value::BorrowedStrDeserializer::new(k)),
                        Key::Owned(k) => seed.deserialize(k.into_deserializer()),
                    }
                    .map(Some);
                }
                None => {
                    self.inner.next_value::<IgnoredAny>()?;
                }
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.inner.next_value_seed(PrunedSeed {
            inner: seed,
            keep: self.value,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::{Value, json};

    const META: Keep = Keep::Fields(&[("name", Keep::All), ("annotations", Keep::Keys(&["keep/me"]))]);
    const OBJECT: Keep = Keep::Fields(&[
        ("metadata", META),
        ("ports", Keep::Items(&Keep::Fields(&[("port", Keep::All)]))),
    ]);

    fn pruned(value: &Value) -> Value {
        Value::deserialize(Pruned::new(value, &OBJECT)).unwrap()
    }

    #[test]
    fn only_kept_fields_reach_the_target() {
        let full = json!({
            "metadata": {"name": "web", "uid": "u", "annotations": {"keep/me": "1", "last-applied": "{...}"}},
            "ports": [{"port": 80, "name": "http"}, {"port": 443}],
            "status": {"huge": [1, 2, 3]},
        });
        assert_eq!(
            pruned(&full),
            json!({"metadata": {"name": "web", "annotations": {"keep/me": "1"}}, "ports": [{"port": 80}, {"port": 443}]})
        );
    }

    #[test]
    fn a_field_not_kept_cannot_fail_and_a_kept_one_still_can() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Port {
            port: i32,
        }
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Object {
            ports: Vec<Port>,
        }
        let unread_wrong = json!({"ports": [{"port": 80, "name": ["not", "a", "string"]}], "status": 5});
        assert!(Object::deserialize(Pruned::new(&unread_wrong, &OBJECT)).is_ok());
        let read_wrong = json!({"ports": [{"port": "80"}]});
        let error = Object::deserialize(Pruned::new(&read_wrong, &OBJECT)).unwrap_err();
        assert!(
            error.to_string().contains("invalid type: string \"80\""),
            "{error}"
        );
        // The path names the field through the adapter.
        let error =
            serde_path_to_error::deserialize::<_, Object>(Pruned::new(&read_wrong, &OBJECT)).unwrap_err();
        assert_eq!(error.path().to_string(), "ports[0].port");
    }

    #[test]
    fn keeps_answers_for_field_paths() {
        use PathStep::{Index, Key};
        assert!(OBJECT.keeps([Key("metadata"), Key("name")]));
        assert!(OBJECT.keeps([Key("ports"), Index, Key("port")]));
        assert!(!OBJECT.keeps([Key("ports"), Index, Key("name")]));
        assert!(!OBJECT.keeps([Key("status")]));
        assert!(OBJECT.keeps([Key("metadata"), Key("annotations"), Key("keep/me")]));
        assert!(!OBJECT.keeps([Key("metadata"), Key("annotations"), Key("other")]));
    }
}
