//! The agent DaemonSet a PortPolicy with `spec.agent` asks for.
//!
//! One DaemonSet per policy, not one shared by all: each policy carries its own image, node
//! selector and tolerations, so a shared DaemonSet would need a merge rule for conflicting
//! choices, and deleting one policy would have to rewrite the others' agent. Per policy, the
//! ownerReference (controller=true) makes the garbage collector remove the agent with its policy.
//!
//! Privileges: IPVS and nftables need `NET_ADMIN` in the host network namespace
//! (`hostNetwork: true`). The IPVS sysctls live under `/proc/sys/net`, which container runtimes
//! mount read-only for unprivileged containers; instead of running privileged, the host's
//! `/proc/sys/net` is bind-mounted read-write at [`SYSCTL_MOUNT`], so the agent writes the few
//! sysctls it needs there and nothing else on the host is exposed.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource,
    ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource as _;

use portpolicy_core::crd::{AgentSpec, PortPolicy};
use portpolicy_core::hash::fnv1a_32;
use portpolicy_core::ipvs::ProxyMode;

/// Port of the agent's `/healthz` and `/readyz`; the agent binds it on the host network.
pub(crate) const AGENT_HEALTH_PORT: i32 = 10265;
pub(crate) const AGENT_SERVICE_ACCOUNT: &str = "portpolicy-agent";
/// Where the host's `/proc/sys/net` is mounted writable in the agent container.
pub(crate) const SYSCTL_MOUNT: &str = "/host/proc/sys/net";
/// Label every agent object carries, with the policy's name as value.
pub(crate) const POLICY_LABEL: &str = "portpolicy.io/policy";
const APP_LABEL: &str = "app.kubernetes.io/name";
const AGENT_APP: &str = "portpolicy-agent";

/// Name of a policy's agent DaemonSet. DaemonSet names are DNS subdomains (253 chars) and the
/// policy name is one too, so long names are cut and kept unique with a hash of the full name.
pub(crate) fn daemon_set_name(policy: &str) -> String {
    const PREFIX: &str = "portpolicy-agent-";
    // Pod names add a 5-character suffix and must stay within 63 characters for the hostname.
    const MAX: usize = 63 - 6;
    let name = format!("{PREFIX}{policy}");
    if name.len() <= MAX {
        return name;
    }
    let hash = fnv1a_32(policy.as_bytes());
    let keep = MAX - PREFIX.len() - 9;
    let cut: String = policy.chars().take(keep).collect();
    format!("{PREFIX}{}-{hash:08x}", cut.trim_end_matches(['-', '.']))
}

/// The ownerReference that ties an object to its policy and lets the garbage collector delete it.
pub(crate) fn owner_reference(policy: &PortPolicy) -> Option<OwnerReference> {
    let mut owner = policy.controller_owner_ref(&())?;
    owner.block_owner_deletion = Some(true);
    Some(owner)
}

/// The DaemonSet for `policy`'s agent, or `None` when the policy has no `spec.agent` (or no uid
/// yet, so it cannot own anything).
pub(crate) fn desired_daemon_set(
    policy: &PortPolicy,
    namespace: &str,
    default_image: &str,
) -> Option<DaemonSet> {
    let agent = policy.spec.agent.as_ref()?;
    let owner = owner_reference(policy)?;
    let policy_name = policy.name();
    let labels = BTreeMap::from([
        (APP_LABEL.to_string(), AGENT_APP.to_string()),
        (POLICY_LABEL.to_string(), policy_name.to_string()),
    ]);
    Some(DaemonSet {
        metadata: ObjectMeta {
            name: Some(daemon_set_name(policy_name)),
            namespace: Some(namespace.to_string()),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::Int(1)),
                    ..Default::default()
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(pod_spec(agent, default_image)),
            },
            ..Default::default()
        }),
        status: None,
    })
}

fn pod_spec(agent: &AgentSpec, default_image: &str) -> PodSpec {
    let image = agent.image.clone().unwrap_or_else(|| default_image.to_string());
    let container = Container {
        name: "agent".into(),
        image: Some(image),
        args: Some(agent_args(agent)),
        env: Some(vec![
            EnvVar {
                name: "NODE_NAME".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "spec.nodeName".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            EnvVar {
                name: "PORTPOLICY_SYSCTL_ROOT".into(),
                value: Some(SYSCTL_MOUNT.trim_end_matches("/net").into()),
                ..Default::default()
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("health".into()),
            container_port: AGENT_HEALTH_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".into()),
                port: IntOrString::Int(AGENT_HEALTH_PORT),
                ..Default::default()
            }),
            period_seconds: Some(10),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz".into()),
                port: IntOrString::Int(AGENT_HEALTH_PORT),
                ..Default::default()
            }),
            initial_delay_seconds: Some(10),
            period_seconds: Some(20),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            // Capabilities are only effective for root without ambient-capability support; the
            // image's default user is non-root (for the operator), so the agent says root here.
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "proc-sys-net".into(),
            mount_path: SYSCTL_MOUNT.into(),
            ..Default::default()
        }]),
        ..Default::default()
    };
    PodSpec {
        service_account_name: Some(AGENT_SERVICE_ACCOUNT.into()),
        host_network: Some(true),
        // With hostNetwork the pod must still resolve cluster names through cluster DNS.
        dns_policy: Some("ClusterFirstWithHostNet".into()),
        node_selector: (!agent.node_selector.is_empty()).then(|| agent.node_selector.clone()),
        tolerations: (!agent.tolerations.is_empty()).then(|| agent.tolerations.clone()),
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: "proc-sys-net".into(),
            host_path: Some(HostPathVolumeSource {
                path: "/proc/sys/net".into(),
                type_: Some("Directory".into()),
            }),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// The agent's command line. `spec.agent.masquerade` becomes its masquerading flags, which its
/// nftables ruleset follows.
pub(crate) fn agent_args(agent: &AgentSpec) -> Vec<String> {
    let mut args = vec![
        "agent".to_string(),
        "--mode".into(),
        ProxyMode::Delegated.as_str().into(),
        "--metrics-address".into(),
        format!("0.0.0.0:{AGENT_HEALTH_PORT}"),
    ];
    if let Some(masquerade) = &agent.masquerade {
        if masquerade.all {
            args.push("--masquerade-all".into());
        }
        if !masquerade.cluster_cidrs.is_empty() {
            args.push(format!("--cluster-cidr={}", masquerade.cluster_cidrs.join(",")));
        }
    }
    args
}

/// `ready/desired` from a DaemonSet's status, and whether every desired pod is ready.
pub(crate) fn agents_ready(daemon_set: &DaemonSet) -> (String, bool) {
    let status = daemon_set.status.as_ref();
    let desired = status.map_or(0, |s| s.desired_number_scheduled);
    let ready = status.map_or(0, |s| s.number_ready);
    let current = status.and_then(|s| s.observed_generation) >= daemon_set.metadata.generation;
    (
        format!("{ready}/{desired}"),
        current && desired > 0 && ready >= desired,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(spec: serde_json::Value) -> PortPolicy {
        serde_json::from_value(json!({
            "apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
            "metadata": {"name": "edge", "uid": "u-1"}, "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn no_agent_no_daemon_set() {
        assert!(desired_daemon_set(&policy(json!({})), "portpolicy-system", "img:1").is_none());
    }

    #[test]
    fn daemon_set_is_owned_privileged_only_as_needed_and_probed() {
        let p = policy(json!({"agent": {"nodeSelector": {"role": "edge"},
            "tolerations": [{"operator": "Exists"}]}}));
        let ds = desired_daemon_set(&p, "portpolicy-system", "img:1").unwrap();
        let owner = &ds.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("PortPolicy", "edge", "u-1")
        );
        assert_eq!(owner.controller, Some(true));
        let pod = ds.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.service_account_name.as_deref(), Some("portpolicy-agent"));
        assert_eq!(pod.node_selector.unwrap()["role"], "edge");
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("img:1"));
        let caps = c
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap();
        assert_eq!(caps.add.as_deref(), Some(&["NET_ADMIN".to_string()][..]));
        assert_eq!(c.security_context.as_ref().unwrap().privileged, Some(false));
        let env = c.env.as_ref().unwrap();
        assert_eq!(
            env[0]
                .value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path,
            "spec.nodeName"
        );
        let probe = c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(
            (probe.path.as_deref(), &probe.port),
            (Some("/readyz"), &IntOrString::Int(10265))
        );
    }

    #[test]
    fn policy_image_wins_over_default() {
        let p = policy(json!({"agent": {"image": "mine:2"}}));
        let ds = desired_daemon_set(&p, "ns", "img:1").unwrap();
        assert_eq!(
            ds.spec.unwrap().template.spec.unwrap().containers[0]
                .image
                .as_deref(),
            Some("mine:2")
        );
    }

    #[test]
    fn long_policy_names_give_distinct_valid_names() {
        let a = daemon_set_name(&"a".repeat(100));
        let b = daemon_set_name(&format!("{}b", "a".repeat(99)));
        assert!(a.len() <= 57 && b.len() <= 57, "{a} {b}");
        assert_ne!(a, b);
        assert_eq!(daemon_set_name("edge"), "portpolicy-agent-edge");
        // Pinned: a different hash would rename the DaemonSets of long-named policies.
        assert!(a.ends_with("-0a0bb1d9"), "{a}");
    }

    #[test]
    fn agents_ready_counts() {
        let ds: DaemonSet = serde_json::from_value(json!({
            "metadata": {"name": "x", "generation": 2},
            "status": {"desiredNumberScheduled": 3, "numberReady": 2, "currentNumberScheduled": 3,
                "numberMisscheduled": 0, "observedGeneration": 2}
        }))
        .unwrap();
        assert_eq!(agents_ready(&ds), ("2/3".to_string(), false));
    }

    /// What the agent does with the flags the DaemonSet gives it: parsed by the agent's own
    /// flag parser, its nftables ruleset masquerades as the policy asked.
    #[test]
    fn masquerade_spec_reaches_the_agents_nftables_rules() {
        use crate::agent::AgentArgs;
        use crate::agent::nft::{Reach, ruleset};
        use clap::Parser;
        use portpolicy_core::ipvs::{IpvsTable, VirtualServerKey};
        use portpolicy_core::ports::Protocol;

        #[derive(Parser)]
        struct Agent {
            #[command(subcommand)]
            command: Command,
        }
        #[derive(clap::Subcommand)]
        enum Command {
            Agent(AgentArgs),
        }
        let parse = |spec: serde_json::Value| {
            let p = policy(json!({"agent": spec}));
            let ds = desired_daemon_set(&p, "portpolicy-system", "img:1").unwrap();
            let args = ds.spec.unwrap().template.spec.unwrap().containers[0]
                .args
                .clone()
                .unwrap();
            let mut argv = vec!["portpolicy".to_string(), "--node-name".into(), "n1".into()];
            argv.splice(1..1, args);
            let Command::Agent(agent) = Agent::try_parse_from(&argv)
                .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
                .command;
            agent.masquerade()
        };
        let cluster_ip = VirtualServerKey {
            address: "10.96.0.10".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let marks_cluster_ip_traffic = |options| {
            let rules = ruleset(
                [(&cluster_ip, Reach::ClusterIp)],
                &IpvsTable::default(),
                &options,
                &[],
            );
            rules
                .lines()
                .filter(|l| l.contains("@cluster-ips") && l.contains("meta mark set"))
                .map(|l| l.trim().to_string())
                .collect::<Vec<_>>()
        };

        // Without it: cluster-IP traffic is left alone (only node-local clients are masqueraded).
        let none = parse(json!({}));
        assert_eq!(none, Default::default());
        assert!(marks_cluster_ip_traffic(none).is_empty());

        let from_outside = parse(json!({"masquerade": {"clusterCidrs": ["10.244.0.0/16", "fd00:10::/64"]}}));
        assert_eq!(
            from_outside
                .cluster_cidrs
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>(),
            ["10.244.0.0/16", "fd00:10::/64"]
        );
        assert!(!from_outside.all);
        assert_eq!(
            marks_cluster_ip_traffic(from_outside),
            [
                "ip daddr . meta l4proto . th dport @cluster-ips ip saddr != @cluster-cidrs meta mark set meta mark | 0x00004000"
            ]
        );

        let all = parse(json!({"masquerade": {"all": true}}));
        assert!(all.all);
        assert_eq!(
            marks_cluster_ip_traffic(all),
            ["ip daddr . meta l4proto . th dport @cluster-ips meta mark set meta mark | 0x00004000"]
        );
    }
}
