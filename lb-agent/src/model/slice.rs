//! The EndpointSlice as lb keeps it: the fields the model reads, deserialized from the same
//! objects (API server or manifests) as k8s-openapi's `EndpointSlice`, and nothing else.
//!
//! Every endpoint of every slice is held for as long as it exists (the API stores, the manifests'
//! last good reading), so its size is the agent's size: k8s-openapi's `Endpoint` is 352 bytes
//! inline, mostly fields lb never reads (`targetRef`, `deprecatedTopology`, `hostname`, `zone`),
//! each with its strings on the heap; this one is 64 bytes and keeps no string lb does not read
//! (its first address alone: Kubernetes uses no other).
//!
//! Absent or `null` fields read as k8s-openapi reads them: the required ones as empty, the optional
//! ones as `None`; unknown fields are ignored, as there.
//!
//! Of the metadata, what lb does not read is dropped as the object is read: the labels (the one
//! lb reads, `kubernetes.io/service-name`, is kept as [`EndpointSlice::service`]: a label map
//! costs a 544-byte tree node however few labels it holds), annotations, owner references,
//! finalizers and managed fields. Name, namespace, uid and resource version stay (the watcher
//! resumes from the resource version).

use k8s_openapi::{
    api::discovery::v1::{EndpointConditions, EndpointHints, EndpointPort},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::{Deserialize, Deserializer};

/// `discovery.k8s.io/v1` EndpointSlice: metadata, the Service it belongs to, `addressType`,
/// `endpoints` and `ports`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "Read")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    /// Its `kubernetes.io/service-name` label.
    pub service: Option<String>,
    pub address_type: String,
    pub endpoints: Vec<Endpoint>,
    pub ports: Option<Vec<EndpointPort>>,
}

/// An EndpointSlice as read, before its metadata is trimmed.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", expecting = "EndpointSlice")]
struct Read {
    #[serde(default, deserialize_with = "null_as_default")]
    metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    address_type: String,
    #[serde(default, deserialize_with = "null_as_default")]
    endpoints: Vec<Endpoint>,
    #[serde(default)]
    ports: Option<Vec<EndpointPort>>,
}

impl From<Read> for EndpointSlice {
    fn from(r: Read) -> Self {
        let mut m = r.metadata;
        let service = m.labels.take().and_then(|mut l| l.remove(crate::model::LABEL_SERVICE_NAME));
        let metadata = ObjectMeta {
            name: m.name.take(),
            namespace: m.namespace.take(),
            uid: m.uid.take(),
            resource_version: m.resource_version.take(),
            ..ObjectMeta::default()
        };
        Self { metadata, service, address_type: r.address_type, endpoints: r.endpoints, ports: r.ports }
    }
}

/// One endpoint: its first address (the one Kubernetes uses), conditions, topology hints (boxed:
/// most endpoints have none) and node.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", expecting = "Endpoint")]
pub struct Endpoint {
    #[serde(default, deserialize_with = "null_as_default")]
    pub addresses: FirstAddress,
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
    #[serde(default)]
    pub hints: Option<Box<EndpointHints>>,
    #[serde(default)]
    pub node_name: Option<String>,
}

/// An endpoint's `addresses` as lb keeps them: the first only. Every one is read, so that a list
/// k8s-openapi refuses (an item that is no string) is refused here too, at the same field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FirstAddress(Option<String>);

impl FirstAddress {
    /// The first address, if the list had any.
    pub fn first(&self) -> Option<&String> {
        self.0.as_ref()
    }
}

impl<'de> Deserialize<'de> for FirstAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct First;
        impl<'de> serde::de::Visitor<'de> for First {
            type Value = FirstAddress;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // As `Vec<String>` says it.
                f.write_str("a sequence")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<FirstAddress, A::Error> {
                let first = seq.next_element::<String>()?;
                // Not asked again once it said there was no more.
                if first.is_some() {
                    while seq.next_element::<String>()?.is_some() {}
                }
                Ok(FirstAddress(first))
            }
        }
        d.deserialize_seq(First)
    }
}

/// A required field that is `null` reads as its empty value, as k8s-openapi reads it.
fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What this type keeps of a slice is what k8s-openapi's type reads of it, for slices with
    /// every field, with fields absent, `null` or unknown; and what it refuses, it refuses too.
    #[test]
    fn reads_what_k8s_openapi_reads_of_the_fields_lb_uses() {
        type Full = k8s_openapi::api::discovery::v1::EndpointSlice;
        // The three ways an object is read: YAML text, a YAML value with the failing field's path
        // (the manifests' reader), and JSON (the API server's).
        fn readings<T: serde::de::DeserializeOwned>(text: &str) -> [Result<T, String>; 3] {
            let value: Result<serde_yaml::Value, _> = serde_yaml::from_str(text);
            let json = value.as_ref().ok().and_then(|v| serde_json::to_string(v).ok());
            [
                serde_yaml::from_str(text).map_err(|e| e.to_string()),
                match value {
                    Ok(v) => serde_path_to_error::deserialize(v).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                match json {
                    Some(j) => serde_json::from_str(&j).map_err(|e| e.to_string()),
                    None => Err("no JSON".into()),
                },
            ]
        }
        let same_reading =
            |text: &str, way: usize, ours: Result<EndpointSlice, String>, full: Result<Full, String>| {
                let text = format!("{text} (reading {way})");
                match (ours, full) {
                    (Ok(o), Ok(f)) => {
                        let m = &f.metadata;
                        assert_eq!(
                            (
                                &o.metadata.name,
                                &o.metadata.namespace,
                                &o.metadata.uid,
                                &o.metadata.resource_version
                            ),
                            (&m.name, &m.namespace, &m.uid, &m.resource_version),
                            "{text}"
                        );
                        let label = m.labels.as_ref().and_then(|l| l.get(crate::model::LABEL_SERVICE_NAME));
                        assert_eq!(o.service.as_ref(), label, "{text}");
                        assert_eq!(o.metadata.labels, None, "{text}");
                        assert_eq!(o.metadata.annotations, None, "{text}");
                        assert_eq!(o.address_type, f.address_type, "{text}");
                        assert_eq!(o.ports, f.ports, "{text}");
                        assert_eq!(o.endpoints.len(), f.endpoints.len(), "{text}");
                        for (a, b) in o.endpoints.iter().zip(&f.endpoints) {
                            assert_eq!(
                                (a.addresses.first(), &a.conditions, a.hints.as_deref(), &a.node_name),
                                (b.addresses.first(), &b.conditions, b.hints.as_ref(), &b.node_name),
                                "{text}"
                            );
                        }
                    }
                    // The same refusal, at the same field (the YAML text's positions aside).
                    (Err(o), Err(f)) => {
                        if way > 0 {
                            assert_eq!(o, f, "{text}");
                        }
                    }
                    (o, f) => panic!("{text}: ours {o:?}, k8s-openapi's {f:?}"),
                }
            };
        let same = |text: &str| {
            for (way, (ours, full)) in
                readings::<EndpointSlice>(text).into_iter().zip(readings::<Full>(text)).enumerate()
            {
                // Known and left: serde's derived readers take a JSON array as the struct's fields in
                // order, which k8s-openapi's refuse; no source sends one (the API server sends
                // objects, and the manifests' reader picks objects by their `kind`).
                if way == 2 && text.starts_with('[') {
                    continue;
                }
                same_reading(text, way, ours, full);
            }
        };
        let full = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: a, labels: {kubernetes.io/service-name: web, x: y}, annotations: {x: y}, uid: u1, resourceVersion: '17', ownerReferences: [{apiVersion: v1, kind: Service, name: web, uid: u0}]}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP, appProtocol: http}, {port: 53, protocol: UDP}]\nendpoints:\n- addresses: [10.0.0.9, 10.0.0.10]\n  conditions: {ready: true, serving: true, terminating: false}\n  hints: {forZones: [{name: z1}], forNodes: [{name: n1}]}\n  nodeName: n1\n  zone: z1\n  hostname: h\n  targetRef: {kind: Pod, name: web-abc, namespace: a, uid: 0f1e}\n  deprecatedTopology: {k: v}\n- addresses: [fd00::1]\n";
        same(full);
        for text in [
            "addressType: IPv6\nendpoints: [{addresses: [fd00::1]}]\n",
            "metadata: {name: x}\n",
            "metadata: {name: x, labels: {a: b}}\n",
            "metadata: {name: x, labels: null}\n",
            "metadata: {name: x, labels: {kubernetes.io/service-name: null}}\n",
            "metadata: {name: x, labels: 5}\n",
            "metadata: null\naddressType: null\nendpoints: null\nports: null\n",
            "addressType: IPv4\nendpoints: [{addresses: null, conditions: null, hints: null, nodeName: null}]\n",
            "addressType: IPv4\nendpoints: [{}]\nunknown: 5\n",
            "addressType: IPv4\nendpoints: [{addresses: [10.0.0.1], conditions: {}}]\nports: []\n",
            "addressType: IPv4\nendpoints: [{addresses: [10.0.0.1], conditions: {ready: false, terminating: true}}]\n",
            "addressType: 7\n",
            "endpoints: [{addresses: 10.0.0.1}]\n",
            "endpoints: [{addresses: []}, {addresses: [a, b, c]}, {addresses: ['10.0.0.1']}]\n",
            "endpoints: [{addresses: [10.0.0.1, 7]}]\n",
            "endpoints: [{addresses: [10.0.0.1, [x]]}]\n",
            "endpoints: [{addresses: [10.0.0.1, null]}]\n",
            "endpoints: [{addresses: [10.0.0.1], hints: {forZones: [{name: z}], forNodes: null}}]\n",
            "endpoints: [{addresses: [10.0.0.1], hints: {forZones: 5}}]\n",
            "endpoints: [{addresses: [10.0.0.1], conditions: {ready: maybe}}]\n",
            "endpoints: [{addresses: [10.0.0.1], nodeName: [n1]}]\n",
            "ports: [{port: eighty}]\n",
            "endpoints: 5\n",
            "[]\n",
        ] {
            same(text);
        }
    }

    #[test]
    fn an_endpoint_is_small() {
        assert!(size_of::<Endpoint>() <= 64, "{} bytes", size_of::<Endpoint>());
        assert!(size_of::<k8s_openapi::api::discovery::v1::Endpoint>() >= 300);
    }
}
