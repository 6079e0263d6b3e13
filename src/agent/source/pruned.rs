//! What the agent's watches decode each listed or watched object into: only the fields
//! portpolicy reads ([`read_pruned`], the snapshot loader's field lists), so that neither a list
//! page nor a watch event ever holds a whole object's tree (managedFields, annotations, status
//! the agent never reads), and one object that does not read never fails its list.

use std::borrow::Cow;
use std::fmt;
use std::io::Write;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::Deserialize;
use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use portpolicy_core::snapshot::read_pruned;

/// One object as the agent's watches keep it: pruned, or, when a field portpolicy reads does
/// not parse, why not and the object's identity. The identity (name, namespace,
/// resourceVersion) is kept either way: kube's watcher reads every watched object's
/// resourceVersion through [`Resource::meta`] (an event without one makes it re-list), and the
/// agent names the object in its log and finds its deletion on a re-list.
#[derive(Clone, Debug)]
pub(in crate::agent) enum Pruned<K> {
    Read(K),
    Unreadable {
        metadata: Box<ObjectMeta>,
        error: String,
    },
}

impl<K> Pruned<K>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    /// Reads one object's JSON text.
    pub(in crate::agent) fn from_json(json: &str) -> Self {
        match read_pruned::<K>(json) {
            Ok(object) => Pruned::Read(object),
            Err(error) => Pruned::Unreadable {
                metadata: Box::new(identity(json)),
                error,
            },
        }
    }

    /// The object's namespace (empty when cluster-scoped) and name.
    pub(in crate::agent) fn key(&self) -> (String, String) {
        let meta = self.meta();
        (
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }
}

/// Name, namespace and resourceVersion, each kept only if it is a string, whatever the rest of
/// the object holds.
fn identity(json: &str) -> ObjectMeta {
    fn text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Some(s),
            _ => None,
        })
    }
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        #[serde(default, deserialize_with = "text")]
        name: Option<String>,
        #[serde(default, deserialize_with = "text")]
        namespace: Option<String>,
        #[serde(default, deserialize_with = "text")]
        resource_version: Option<String>,
    }
    #[derive(Deserialize, Default)]
    struct Object {
        #[serde(default)]
        metadata: Meta,
    }
    let meta = serde_json::from_str::<Object>(json).unwrap_or_default().metadata;
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        resource_version: meta.resource_version,
        ..Default::default()
    }
}

impl<K> Resource for Pruned<K>
where
    K: Resource<DynamicType = ()>,
{
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        match self {
            Pruned::Read(object) => object.meta(),
            Pruned::Unreadable { metadata, .. } => metadata,
        }
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Pruned::Read(object) => object.meta_mut(),
            Pruned::Unreadable { metadata, .. } => metadata,
        }
    }
}

/// Each object is written back to JSON text as it is decoded (from a list response or a watch
/// event, whichever way serde hands it over), then read pruned: only that one object's text is
/// ever held, never a tree of it.
impl<'de, K> Deserialize<'de> for Pruned<K>
where
    K: Resource<DynamicType = ()> + DeserializeOwned,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut text = Vec::new();
        JsonText(&mut text).deserialize(deserializer)?;
        let text = String::from_utf8(text).map_err(de::Error::custom)?;
        Ok(Pruned::from_json(&text))
    }
}

/// Writes the JSON value it is handed as JSON text. Works from any deserializer: straight
/// from serde_json's, and from serde's buffer when an adjacently tagged watch event lists its
/// `object` before its `type` (where `serde_json::value::RawValue` cannot be read).
struct JsonText<'a>(&'a mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for JsonText<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JsonText<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.0.extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        write!(self.0, "{v}").map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        write!(self.0, "{v}").map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        serde_json::to_writer(&mut *self.0, &v).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        serde_json::to_writer(&mut *self.0, v).map_err(E::custom)
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.push(b'[');
        let mut first = true;
        loop {
            let mark = self.0.len();
            if !first {
                self.0.push(b',');
            }
            if seq.next_element_seed(JsonText(&mut *self.0))?.is_none() {
                self.0.truncate(mark);
                break;
            }
            first = false;
        }
        self.0.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.push(b'{');
        let mut first = true;
        loop {
            let mark = self.0.len();
            if !first {
                self.0.push(b',');
            }
            if map.next_key_seed(JsonText(&mut *self.0))?.is_none() {
                self.0.truncate(mark);
                break;
            }
            self.0.push(b':');
            map.next_value_seed(JsonText(&mut *self.0))?;
            first = false;
        }
        self.0.push(b'}');
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use kube::core::ObjectList;
    use kube::core::WatchEvent;

    use super::*;

    const GOOD: &str = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","namespace":"shop",
        "resourceVersion":"7","managedFields":[{"manager":"kubectl","fieldsV1":{"f:spec":{}}}],
        "annotations":{"note":"a \"quoted\" \u00e9 text\n"}},"spec":{"clusterIP":"10.96.0.10",
        "ports":[{"port":80,"targetPort":8080}],"selector":{"app":"web"}},"status":{"loadBalancer":{}}}"#;
    const BAD: &str = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"broken","namespace":"shop",
        "resourceVersion":"8"},"spec":{"ports":[{"port":"eighty"}]}}"#;

    fn read(pruned: Pruned<Service>) -> Service {
        match pruned {
            Pruned::Read(service) => service,
            Pruned::Unreadable { error, .. } => panic!("{error}"),
        }
    }

    #[test]
    fn a_list_keeps_what_portpolicy_reads_and_names_what_does_not_read() {
        let list: ObjectList<Pruned<Service>> = serde_json::from_str(&format!(
            r#"{{"apiVersion":"v1","kind":"ServiceList","metadata":{{"resourceVersion":"9"}},"items":[{GOOD},{BAD}]}}"#
        ))
        .unwrap();
        let mut items = list.items.into_iter();
        let good = items.next().unwrap();
        assert_eq!(good.key(), ("shop".to_string(), "web".to_string()));
        assert_eq!(good.meta().resource_version.as_deref(), Some("7"));
        let service = read(good);
        assert_eq!(service.metadata.managed_fields, None, "pruned");
        assert!(
            service.metadata.annotations.unwrap_or_default().is_empty(),
            "pruned"
        );
        let spec = service.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(spec.ports.unwrap()[0].port, 80);
        assert_eq!(spec.selector, None, "pruned");
        // The bad one is kept as its identity and the reason, for the watcher and the log.
        let bad = items.next().unwrap();
        assert_eq!(bad.key(), ("shop".to_string(), "broken".to_string()));
        assert_eq!(bad.meta().resource_version.as_deref(), Some("8"));
        let Pruned::Unreadable { error, .. } = bad else {
            panic!("{bad:?} read")
        };
        assert!(error.starts_with("spec.ports[0].port: invalid type"), "{error}");
    }

    /// serde buffers an adjacently tagged enum's content when it comes before the tag; the
    /// object reads the same either way.
    #[test]
    fn a_watch_event_reads_whichever_field_comes_first() {
        for event in [
            format!(r#"{{"type":"MODIFIED","object":{GOOD}}}"#),
            format!(r#"{{"object":{GOOD},"type":"MODIFIED"}}"#),
        ] {
            let event: WatchEvent<Pruned<Service>> = serde_json::from_str(&event).unwrap();
            let WatchEvent::Modified(object) = event else {
                panic!("{event:?}")
            };
            assert_eq!(object.meta().resource_version.as_deref(), Some("7"));
            let service = read(object);
            assert_eq!(service.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.10"));
        }
    }

    #[test]
    fn text_is_written_back_as_it_was_read() {
        let json =
            r#"{"a":[1,-2,3.5,1e300,true,false,null,"x\"\\\u0001é"],"b":{},"c":[],"d":{"e":{"f":[[]]}}}"#;
        for text in [
            json,
            &serde_json::to_string(&serde_json::from_str::<serde_json::Value>(json).unwrap()).unwrap(),
        ] {
            let mut out = Vec::new();
            JsonText(&mut out)
                .deserialize(&mut serde_json::Deserializer::from_str(text))
                .unwrap();
            let back: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(back, serde_json::from_str::<serde_json::Value>(json).unwrap());
        }
    }

    #[test]
    fn an_object_without_readable_metadata_is_unreadable_without_identity() {
        let object = Pruned::<Service>::from_json(r#"{"metadata":{"name":5,"namespace":"shop"},"spec":7}"#);
        let Pruned::Unreadable { metadata, .. } = &object else {
            panic!("{object:?} read")
        };
        assert_eq!(metadata.name, None);
        assert_eq!(metadata.namespace.as_deref(), Some("shop"));
        let object = Pruned::<Service>::from_json("[]");
        assert!(matches!(object, Pruned::Unreadable { .. }));
        assert_eq!(object.key(), (String::new(), String::new()));
    }
}
