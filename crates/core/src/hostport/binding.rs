//! Which (protocol, hostIP, hostPort) a Pod binds on its node, as the scheduler counts them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use crate::ports::{Protocol, port_from_i32};
use crate::problem::Problem;

use super::pod::{DeclaredPort, HostPortPod, HostPortPodSpec, PortedContainer};

/// One port a Pod holds on its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPortBinding {
    pub protocol: Protocol,
    /// `0.0.0.0` when the Pod left `hostIP` empty.
    pub host_ip: IpAddr,
    pub host_port: u16,
}

impl HostPortBinding {
    /// Binds every address of the node: `0.0.0.0`, or `::`. Upstream's scheduler only knows
    /// `0.0.0.0`; treating `::` alike is deliberate, since a socket on `::` takes the port on
    /// every IPv6 address (and, dual-stack, every IPv4 one) just the same.
    pub(crate) fn binds_all_addresses(&self) -> bool {
        self.host_ip.is_unspecified()
    }

    /// Whether two Pods could not both hold these ports on one node.
    pub fn conflicts_with(&self, other: &HostPortBinding) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && (self.binds_all_addresses() || other.binds_all_addresses() || self.host_ip == other.host_ip)
    }
}

impl fmt::Display for HostPortBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            IpAddr::V4(ip) => write!(f, "{} {ip}:{}", self.protocol, self.host_port),
            IpAddr::V6(ip) => write!(f, "{} [{ip}]:{}", self.protocol, self.host_port),
        }
    }
}

impl HostPortPod {
    /// The ports this Pod holds on its node, and a problem for each value the API would reject.
    pub fn bindings(&self) -> (Vec<HostPortBinding>, Vec<Problem>) {
        self.spec.bindings_naming(|| self.object_ref(), "spec")
    }
}

impl HostPortPodSpec {
    /// The effective bindings of this spec. `object` and `field_prefix` (`spec` for a Pod,
    /// `spec.template.spec` for a workload) name the source in problems. An invalid port, or a
    /// duplicate within the Pod, is reported and left out; the other ports still count.
    pub fn bindings(&self, object: &str, field_prefix: &str) -> (Vec<HostPortBinding>, Vec<Problem>) {
        self.bindings_naming(|| object.to_string(), field_prefix)
    }

    /// Like [`Self::bindings`], but names the object only when there is a problem: this runs for
    /// every stored Pod on every check, and almost none has one.
    fn bindings_naming(
        &self,
        object: impl Fn() -> String,
        field_prefix: &str,
    ) -> (Vec<HostPortBinding>, Vec<Problem>) {
        let mut bindings = Vec::new();
        let mut problems = Vec::new();
        // Where each binding was declared, to name the first one when a duplicate shows up.
        // Pods declare a handful of ports, so a linear search beats hashing.
        let mut declared_at: Vec<(&str, u16, u16)> = Vec::new();
        let field = |list: &str, container: u16, port: u16| {
            format!("{field_prefix}.{list}[{container}].ports[{port}]")
        };
        let lists = [
            ("containers", &self.containers),
            ("initContainers", &self.init_containers),
        ];
        for (list, containers) in lists {
            for container in containers.iter() {
                for port in &container.ports {
                    let binding = match self.binding_of(container, port) {
                        Ok(Some(binding)) => binding,
                        Ok(None) => continue,
                        Err((subfield, message)) => {
                            let at = field(list, container.index, port.index);
                            problems.push(Problem::new(object(), format!("{at}.{subfield}"), message));
                            continue;
                        }
                    };
                    // The API compares the raw strings; comparing defaulted values also catches
                    // `hostIP: ""` next to `hostIP: 0.0.0.0`, which the kubelet cannot bind twice.
                    if let Some(i) = bindings.iter().position(|b| *b == binding) {
                        let (first_list, first_container, first_port) = declared_at[i];
                        problems.push(Problem::new(
                            object(),
                            field(list, container.index, port.index),
                            format!(
                                "duplicates {} ({binding}): a Pod may declare each hostPort once, \
                                 so the API server rejects this Pod",
                                field(first_list, first_container, first_port)
                            ),
                        ));
                        continue;
                    }
                    declared_at.push((list, container.index, port.index));
                    bindings.push(binding);
                }
            }
        }
        (bindings, problems)
    }

    /// The binding one declared port makes: `Ok(None)` when it binds nothing on the host, or the
    /// offending sub-field and why.
    fn binding_of(
        &self,
        container: &PortedContainer,
        port: &DeclaredPort,
    ) -> Result<Option<HostPortBinding>, (&'static str, String)> {
        let in_container = || format!("in container {:?}", container.name);
        let host_port = if self.host_network {
            // Defaulting sets hostPort = containerPort on host-network Pods, and validation
            // insists they are equal: the process binds containerPort on the node itself.
            let container_port = port_from_i32(port.container_port)
                .map_err(|e| ("containerPort", format!("{e} {}", in_container())))?;
            if port.host_port != 0 && port.host_port != port.container_port {
                return Err((
                    "hostPort",
                    format!(
                        "{} differs from containerPort {} {}: on a hostNetwork Pod they must be equal",
                        port.host_port,
                        port.container_port,
                        in_container()
                    ),
                ));
            }
            container_port
        } else if port.host_port == 0 {
            return Ok(None);
        } else {
            port_from_i32(port.host_port).map_err(|e| ("hostPort", format!("{e} {}", in_container())))?
        };
        let protocol = Protocol::from_k8s(port.protocol.as_deref())
            .map_err(|e| ("protocol", format!("{e} {}", in_container())))?;
        let host_ip = match port.host_ip.as_deref() {
            None | Some("") => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Some(text) => text.parse().map_err(|_| {
                (
                    "hostIP",
                    format!("{text:?} is not an IP address {}", in_container()),
                )
            })?,
        };
        Ok(Some(HostPortBinding {
            protocol,
            host_ip,
            host_port,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;
    use serde_json::{Value, json};

    fn pod(spec: Value) -> HostPortPod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": spec,
        }))
        .unwrap()
    }

    fn b(protocol: Protocol, ip: &str, port: u16) -> HostPortBinding {
        HostPortBinding {
            protocol,
            host_ip: ip.parse().unwrap(),
            host_port: port,
        }
    }

    use Protocol::{Sctp, Tcp, Udp};

    #[test]
    fn conflict_rule_table() {
        let cases = [
            (b(Tcp, "0.0.0.0", 80), b(Tcp, "0.0.0.0", 80), true),
            (b(Tcp, "0.0.0.0", 80), b(Tcp, "10.0.0.1", 80), true),
            (b(Tcp, "10.0.0.1", 80), b(Tcp, "0.0.0.0", 80), true),
            (b(Tcp, "::", 80), b(Tcp, "10.0.0.1", 80), true),
            (b(Tcp, "fd00::1", 80), b(Tcp, "::", 80), true),
            (b(Tcp, "10.0.0.1", 80), b(Tcp, "10.0.0.1", 80), true),
            (b(Tcp, "fd00::1", 80), b(Tcp, "fd00:0::1", 80), true),
            (b(Tcp, "10.0.0.1", 80), b(Tcp, "10.0.0.2", 80), false),
            (b(Tcp, "10.0.0.1", 80), b(Tcp, "fd00::1", 80), false),
            (b(Tcp, "0.0.0.0", 80), b(Udp, "0.0.0.0", 80), false),
            (b(Udp, "0.0.0.0", 53), b(Sctp, "0.0.0.0", 53), false),
            (b(Tcp, "0.0.0.0", 80), b(Tcp, "0.0.0.0", 81), false),
        ];
        for (x, y, want) in cases {
            assert_eq!(x.conflicts_with(&y), want, "{x} vs {y}");
            assert_eq!(y.conflicts_with(&x), want, "{y} vs {x} (symmetry)");
        }
    }

    #[test]
    fn defaults_and_what_counts() {
        let (bindings, problems) = pod(json!({
            "containers": [
                {"name": "a", "ports": [
                    {"containerPort": 8080, "hostPort": 80},
                    {"containerPort": 8053, "hostPort": 53, "protocol": "UDP", "hostIP": "10.0.0.5"},
                    {"containerPort": 9090},
                    {"containerPort": 9091, "hostPort": 0},
                ]},
            ],
            "initContainers": [
                {"name": "setup", "ports": [{"containerPort": 7000, "hostPort": 7000}]},
                {"name": "mesh", "restartPolicy": "Always", "ports": [{"containerPort": 15001, "hostPort": 15001, "hostIP": "fd00::5"}]},
            ],
        }))
        .bindings();
        assert_eq!(problems, []);
        assert_eq!(
            bindings,
            [
                b(Tcp, "0.0.0.0", 80),
                b(Udp, "10.0.0.5", 53),
                b(Tcp, "fd00::5", 15001)
            ]
        );
        assert_eq!(bindings[2].to_string(), "TCP [fd00::5]:15001");
    }

    #[test]
    fn host_network_pods_bind_every_container_port() {
        let (bindings, problems) = pod(json!({
            "hostNetwork": true,
            "containers": [{"name": "a", "ports": [
                {"containerPort": 9100},
                {"containerPort": 9101, "hostPort": 9101, "protocol": "UDP"},
                {"containerPort": 9102, "hostPort": 9200},
            ]}],
        }))
        .bindings();
        assert_eq!(bindings, [b(Tcp, "0.0.0.0", 9100), b(Udp, "0.0.0.0", 9101)]);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].object, "Pod/ns/p");
        assert_eq!(problems[0].field, "spec.containers[0].ports[2].hostPort");
    }

    #[test]
    fn invalid_values_are_problems_naming_the_field() {
        let (bindings, problems) = pod(json!({
            "containers": [
                {"name": "ok", "ports": [{"containerPort": 1, "hostPort": 1}]},
                {"name": "bad", "ports": [
                    {"containerPort": 80, "hostPort": 80, "hostIP": "10.0.0.256"},
                    {"containerPort": 81, "hostPort": 70000},
                    {"containerPort": 82, "hostPort": -1},
                    {"containerPort": 83, "hostPort": 83, "protocol": "tcp"},
                ]},
            ],
        }))
        .bindings();
        assert_eq!(bindings, [b(Tcp, "0.0.0.0", 1)]);
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.containers[1].ports[0].hostIP",
                "spec.containers[1].ports[1].hostPort",
                "spec.containers[1].ports[2].hostPort",
                "spec.containers[1].ports[3].protocol",
            ]
        );
        assert!(problems[0].message.contains("\"10.0.0.256\""), "{}", problems[0]);
        assert!(problems[0].message.contains("\"bad\""), "{}", problems[0]);
    }

    #[test]
    fn duplicate_within_a_pod_is_a_problem_not_a_second_binding() {
        let (bindings, problems) = pod(json!({
            "containers": [
                {"name": "a", "ports": [{"containerPort": 80, "hostPort": 80}]},
                {"name": "b", "ports": [
                    {"containerPort": 81, "hostPort": 80, "hostIP": "0.0.0.0", "protocol": "TCP"},
                    {"containerPort": 82, "hostPort": 80, "protocol": "UDP"},
                ]},
            ],
            "initContainers": [
                {"name": "side", "restartPolicy": "Always", "ports": [{"containerPort": 83, "hostPort": 80, "protocol": "UDP"}]},
            ],
        }))
        .bindings();
        assert_eq!(bindings, [b(Tcp, "0.0.0.0", 80), b(Udp, "0.0.0.0", 80)]);
        let found: Vec<_> = problems
            .iter()
            .map(|p| (p.field.as_str(), p.message.split(" (").next().unwrap()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "spec.containers[1].ports[0]",
                    "duplicates spec.containers[0].ports[0]"
                ),
                (
                    "spec.initContainers[0].ports[0]",
                    "duplicates spec.containers[1].ports[1]"
                ),
            ]
        );
    }
}
