//! UDP flows to clear after the table changed, as kube-proxy's conntrack cleanup decides them.
//!
//! UDP has no connection to close. A client that keeps sending from one source port (a DNS
//! resolver, a syslog sender) stays on the connection-tracking entry, and IPVS's connection
//! entry, of its first packet, which names the real server its replies come from. When that
//! real server goes, the agent deletes it at once (never drains UDP, see [`super::diff`]) and
//! the kernel, with `expire_nodest_conn=1`, expires IPVS's entries for it; the conntrack
//! entries must be deleted too, or the client's packets keep matching a dead flow. When a
//! virtual server that had no real servers gains one, entries made while it had none are
//! cleared as well, as kube-proxy does for a Service whose endpoints come back.

use std::collections::HashMap;

use serde::Serialize;

use crate::ports::Protocol;

use super::table::{IpvsOp, IpvsTable, RealServerKey, VirtualServerKey};

/// Conntrack entries to delete: UDP flows sent to `service` (the original destination) whose
/// replies come from `real`, or from anywhere when `real` is `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct StaleFlows {
    pub service: VirtualServerKey,
    pub real: Option<RealServerKey>,
}

/// The flows made stale by `applied`, the operations the kernel accepted, in the order they were
/// applied to the table `before`. Only UDP virtual servers have any.
pub fn stale_udp_flows<'a>(
    before: &IpvsTable,
    applied: impl IntoIterator<Item = &'a IpvsOp>,
) -> Vec<StaleFlows> {
    let mut real_servers: HashMap<VirtualServerKey, usize> = HashMap::new();
    let mut stale = Vec::new();
    for op in applied {
        let count =
            |key: &VirtualServerKey| -> usize { before.get(key).map_or(0, |svc| svc.real_servers.len()) };
        let reals = real_servers
            .entry(*op.service())
            .or_insert_with(|| count(op.service()));
        if op.service().protocol != Protocol::Udp {
            continue;
        }
        match op {
            IpvsOp::AddService { .. } => *reals = 0,
            IpvsOp::DeleteService { key } => {
                *reals = 0;
                stale.push(StaleFlows {
                    service: *key,
                    real: None,
                });
            }
            IpvsOp::AddRealServer { service, .. } => {
                if *reals == 0 {
                    stale.push(StaleFlows {
                        service: *service,
                        real: None,
                    });
                }
                *reals += 1;
            }
            IpvsOp::DeleteRealServer { service, real } => {
                *reals = reals.saturating_sub(1);
                stale.push(StaleFlows {
                    service: *service,
                    real: Some(*real),
                });
            }
            IpvsOp::UpdateService { .. } | IpvsOp::UpdateRealServer { .. } => {}
        }
    }
    stale.sort_unstable();
    stale.dedup();
    stale
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use pretty_assertions::assert_eq;

    use super::*;
    use crate::ipvs::table::test_keys::{rs_key, vs_key};
    use crate::ipvs::{IpvsService, RealServerState};

    fn table(entries: &[(VirtualServerKey, &[RealServerKey])]) -> IpvsTable {
        entries
            .iter()
            .map(|(key, reals)| {
                let service = IpvsService {
                    scheduler: "rr".into(),
                    persistence_timeout: None,
                    real_servers: reals
                        .iter()
                        .map(|r| (*r, RealServerState::with_weight(1)))
                        .collect::<BTreeMap<_, _>>(),
                };
                (*key, service)
            })
            .collect()
    }

    #[test]
    fn removed_udp_real_servers_and_deleted_udp_services_leave_stale_flows() {
        let dns = vs_key("10.96.0.10", 53, Protocol::Udp);
        let web = vs_key("10.96.0.20", 80, Protocol::Tcp);
        let (a, b) = (rs_key("10.0.1.2", 5353), rs_key("10.0.2.2", 5353));
        let gone = vs_key("10.96.0.11", 53, Protocol::Udp);
        let before = table(&[(dns, &[a, b]), (web, &[a]), (gone, &[a])]);
        let applied = [
            IpvsOp::DeleteRealServer {
                service: dns,
                real: a,
            },
            // TCP: connections end on their own; nothing to clear.
            IpvsOp::DeleteRealServer {
                service: web,
                real: a,
            },
            IpvsOp::DeleteService { key: gone },
            IpvsOp::UpdateRealServer {
                service: dns,
                real: b,
                weight: 2,
            },
        ];
        assert_eq!(
            stale_udp_flows(&before, &applied),
            [
                StaleFlows {
                    service: dns,
                    real: Some(a)
                },
                StaleFlows {
                    service: gone,
                    real: None
                },
            ]
        );
    }

    #[test]
    fn a_udp_virtual_server_gaining_its_first_real_server_clears_its_flows_once() {
        let dns = vs_key("10.96.0.10", 53, Protocol::Udp);
        let fresh = vs_key("10.96.0.12", 53, Protocol::Udp);
        let (a, b) = (rs_key("10.0.1.2", 5353), rs_key("10.0.2.2", 5353));
        let before = table(&[(dns, &[])]);
        let applied = [
            IpvsOp::AddRealServer {
                service: dns,
                real: a,
                weight: 1,
            },
            IpvsOp::AddRealServer {
                service: dns,
                real: b,
                weight: 1,
            },
            IpvsOp::AddService {
                key: fresh,
                scheduler: "rr".into(),
                persistence_timeout: None,
            },
            IpvsOp::AddRealServer {
                service: fresh,
                real: a,
                weight: 1,
            },
        ];
        assert_eq!(
            stale_udp_flows(&before, &applied),
            [
                StaleFlows {
                    service: dns,
                    real: None
                },
                StaleFlows {
                    service: fresh,
                    real: None
                },
            ]
        );
        // A real server added beside another leaves nothing stale.
        let before = table(&[(dns, &[a])]);
        let add = [IpvsOp::AddRealServer {
            service: dns,
            real: b,
            weight: 1,
        }];
        assert_eq!(stale_udp_flows(&before, &add), []);
        // Emptied and refilled in one batch: both the removed server's flows and the rest.
        let swap = [
            IpvsOp::DeleteRealServer {
                service: dns,
                real: a,
            },
            IpvsOp::AddRealServer {
                service: dns,
                real: b,
                weight: 1,
            },
        ];
        assert_eq!(stale_udp_flows(&before, &swap).len(), 2);
    }
}
