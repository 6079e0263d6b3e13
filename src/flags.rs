//! What the subcommands' flags share. One convention for all of them: full words, and the
//! upstream flag's name where there is one (`--service-node-port-range`, `--cluster-cidr`,
//! `--masquerade-all`); listen addresses are `--*-address`. Earlier spellings stay as hidden
//! aliases, so existing manifests and scripts keep working.

use clap::builder::{PossibleValuesParser, TypedValueParser};
use portpolicy_core::ipvs::ProxyMode;

/// `--mode delegated|replacement`, with the modes listed in `--help`.
pub fn proxy_mode() -> impl TypedValueParser<Value = ProxyMode> {
    PossibleValuesParser::new(ProxyMode::ALL.map(ProxyMode::as_str)).try_map(|text| text.parse::<ProxyMode>())
}

#[cfg(test)]
mod tests {
    use clap::{Args, Parser};

    use crate::agent::AgentArgs;
    use crate::operator::controller::OperatorArgs;

    #[derive(Parser, Debug)]
    struct Cli<A: Args> {
        #[command(flatten)]
        args: A,
    }

    fn parse<A: Args>(args: &[&str]) -> A {
        Cli::<A>::try_parse_from(std::iter::once("portpolicy").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .args
    }

    #[test]
    fn agent_flags_parse_in_both_spellings() {
        let new: AgentArgs = parse(&[
            "--node-name=n1",
            "--metrics-address=127.0.0.1:9000",
            "--health-check-address=127.0.0.2",
            "--mode=replacement",
        ]);
        let old: AgentArgs = parse(&[
            "--node-name=n1",
            "--metrics-addr=127.0.0.1:9000",
            "--health-check-bind-address=127.0.0.2",
            "--mode=replacement",
        ]);
        assert_eq!(new.metrics_address, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(
            new.health_check_address,
            "127.0.0.2".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(new.mode, portpolicy_core::ipvs::ProxyMode::Replacement);
        assert_eq!(format!("{new:?}"), format!("{old:?}"));
        let default: AgentArgs = parse(&["--node-name=n1"]);
        assert_eq!(default.mode, portpolicy_core::ipvs::ProxyMode::Delegated);
        assert!(Cli::<AgentArgs>::try_parse_from(["portpolicy", "--node-name=n1", "--mode=both"]).is_err());
    }

    #[test]
    fn operator_flags_parse_in_both_spellings() {
        let new: OperatorArgs = parse(&[
            "--service-node-port-range=31000-31999",
            "--metrics-address=127.0.0.1:9000",
        ]);
        let old: OperatorArgs = parse(&[
            "--node-port-range=31000-31999",
            "--metrics-address=127.0.0.1:9000",
        ]);
        assert_eq!(new.node_port_range, "31000-31999".parse().unwrap());
        assert_eq!(format!("{new:?}"), format!("{old:?}"));
    }

    #[test]
    fn the_agent_takes_the_flags_its_daemon_set_passes() {
        let policy: portpolicy_core::crd::PortPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "portpolicy.io/v1alpha1", "kind": "PortPolicy",
            "metadata": {"name": "edge", "uid": "u-1"}, "spec": {"agent": {"proxy": true}}}))
        .unwrap();
        let daemon_set =
            crate::operator::agent::desired_daemon_set(&policy, "portpolicy-system", "img:1").unwrap();
        let pod = daemon_set.spec.unwrap().template.spec.unwrap();
        let args = pod.containers[0].args.clone().unwrap();
        assert_eq!(args[0], "agent");
        // NODE_NAME comes from the downward API in the pod.
        let mut flags: Vec<&str> = args[1..].iter().map(String::as_str).collect();
        flags.push("--node-name=n1");
        let parsed: AgentArgs = parse(&flags);
        assert_eq!(parsed.mode, portpolicy_core::ipvs::ProxyMode::Delegated);
        assert_eq!(
            i32::from(parsed.metrics_address.port()),
            crate::operator::agent::AGENT_HEALTH_PORT
        );
    }
}
