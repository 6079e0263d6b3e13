//! The difference between the kernel's IPVS table and the desired one, as the fewest operations
//! the kernel accepts in order.
//!
//! - An unchanged virtual server gives no operation; a changed scheduler or persistence gives one
//!   `UpdateService`; a changed endpoint one or two real-server operations.
//! - Graceful termination, like kube-proxy's: a TCP real server no longer desired that still has
//!   connections (active or inactive) is set to weight 0 once and left to drain; a later diff
//!   deletes it when its counters are zero. UDP and SCTP real servers are deleted at once (there
//!   is no connection state worth draining, and a weight-0 UDP destination would keep receiving
//!   packets of existing flows). A desired real server found at weight 0 gets its weight back.
//! - A virtual server no longer desired is deleted with its real servers (the kernel deletes a
//!   service's destinations with it), drained or not, as kube-proxy does.
//! - Only virtual servers the agent [owns](Ownership) are touched.
//!
//! Within one virtual server, operations come in kernel-acceptable order: the service is added
//! or updated first, then real servers are added or re-weighted, then old ones are drained or
//! deleted, so a service being switched to new endpoints never has none in between.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use crate::ports::{PortRange, Protocol};

use super::table::{IpvsOp, IpvsService, IpvsTable, VirtualServerKey};

/// Which virtual servers in the kernel the agent may change or delete.
///
/// IPVS is shared with anyone else on the node (kube-proxy in IPVS mode, a load-balancer
/// daemon, an operator typing `ipvsadm`). The agent must never touch what it did not create, and
/// must still find and delete what it created earlier, even after a restart and after the
/// Service is gone. So ownership is decided from what the agent controls on the node rather than
/// from the current plan:
///
/// 1. In replacement mode ([`Ownership::everything`]) every virtual server is owned: no other
///    proxy runs, and stale ones from a previous kube-proxy should go.
/// 2. A virtual server on an address bound on the agent's own dummy interface is owned. Pass the
///    addresses currently bound (read from the kernel before stale ones are unbound), not the
///    plan's VIPs: a deleted Service's cluster IP is still bound, so its virtual servers are
///    still found and deleted; the agent unbinds the address after applying the diff.
/// 3. A virtual server on one of this node's addresses is owned when its port is in one of the
///    agent's node-port ranges (in delegated mode, the ranges of policies that hand Services to
///    the agent; kube-proxy's node ports live outside them).
/// 4. So is one with its port in those ranges on an address that no interface of the node holds
///    ([`Ownership::with_host_addresses`]). kube-proxy serves only on addresses the node holds
///    (node addresses, and its VIPs bound on `kube-ipvs0`), so such a virtual server is a node
///    port of the agent's on an address the Node has lost, perhaps while the agent was down,
///    when nothing in the agent's memory says it was ever a node address.
///
/// A desired virtual server that is not owned is not programmed either: the diff never creates
/// what it would not later be allowed to delete.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ownership {
    everything: bool,
    bound: BTreeSet<IpAddr>,
    node_addresses: BTreeSet<IpAddr>,
    node_port_ranges: Vec<PortRange>,
    /// Every address the node's interfaces hold, when known (rule 4). Shared, not copied: in
    /// delegated mode kube-proxy binds every cluster IP on the node, and ownership is built
    /// on every sync.
    host_addresses: Option<Arc<BTreeSet<IpAddr>>>,
}

impl Ownership {
    /// Owns nothing until told otherwise (delegated mode's starting point).
    pub fn nothing() -> Self {
        Ownership::default()
    }

    /// Owns every virtual server (replacement mode).
    pub fn everything() -> Self {
        Ownership {
            everything: true,
            ..Default::default()
        }
    }

    /// Addresses bound on the agent's own dummy interface: every virtual server on them is owned.
    pub fn with_bound_addresses(mut self, addresses: impl IntoIterator<Item = IpAddr>) -> Self {
        self.bound.extend(addresses);
        self
    }

    /// Virtual servers on these node addresses with a port in one of the ranges are owned.
    pub fn with_node_ports(
        mut self,
        node_addresses: impl IntoIterator<Item = IpAddr>,
        ranges: impl IntoIterator<Item = PortRange>,
    ) -> Self {
        self.node_addresses.extend(node_addresses);
        self.node_port_ranges.extend(ranges);
        self
    }

    /// Every address some interface of the node holds: virtual servers with a port in the
    /// node-port ranges on any other address are owned (rule 4).
    pub fn with_host_addresses(mut self, addresses: Arc<BTreeSet<IpAddr>>) -> Self {
        self.host_addresses = Some(addresses);
        self
    }

    pub fn owns(&self, key: &VirtualServerKey) -> bool {
        if self.everything || self.bound.contains(&key.address) {
            return true;
        }
        let on_node_port_address = self.node_addresses.contains(&key.address)
            || (self.host_addresses.as_ref()).is_some_and(|held| !held.contains(&key.address));
        on_node_port_address && self.node_port_ranges.iter().any(|r| r.contains(key.port))
    }
}

/// Operations turning `current` into `desired` on every owned virtual server.
pub fn diff(current: &IpvsTable, desired: &IpvsTable, ownership: &Ownership) -> Vec<IpvsOp> {
    let mut ops = Vec::new();
    let keys: BTreeSet<&VirtualServerKey> = current.keys().chain(desired.keys()).collect();
    for key in keys {
        if ownership.owns(key) {
            diff_one(key, current.get(key), desired.get(key), &mut ops);
        }
    }
    ops
}

/// Like [`diff`], restricted to `keys` (the planner's dirty keys): the cost is proportional to
/// what changed, not to the table.
pub fn diff_keys(
    current: &IpvsTable,
    desired: &IpvsTable,
    keys: &BTreeSet<VirtualServerKey>,
    ownership: &Ownership,
) -> Vec<IpvsOp> {
    let mut ops = Vec::new();
    for key in keys {
        if ownership.owns(key) {
            diff_one(key, current.get(key), desired.get(key), &mut ops);
        }
    }
    ops
}

fn diff_one(
    key: &VirtualServerKey,
    current: Option<&IpvsService>,
    desired: Option<&IpvsService>,
    ops: &mut Vec<IpvsOp>,
) {
    match (current, desired) {
        (None, None) => {}
        (Some(_), None) => ops.push(IpvsOp::DeleteService { key: *key }),
        (None, Some(want)) => {
            ops.push(IpvsOp::AddService {
                key: *key,
                scheduler: want.scheduler.clone(),
                persistence_timeout: want.persistence_timeout,
            });
            ops.extend(
                want.real_servers
                    .iter()
                    .map(|(real, state)| IpvsOp::AddRealServer {
                        service: *key,
                        real: *real,
                        weight: state.weight,
                    }),
            );
        }
        (Some(have), Some(want)) => {
            if !have.same_settings(want) {
                ops.push(IpvsOp::UpdateService {
                    key: *key,
                    scheduler: want.scheduler.clone(),
                    persistence_timeout: want.persistence_timeout,
                });
            }
            for (real, state) in &want.real_servers {
                match have.real_servers.get(real) {
                    None => ops.push(IpvsOp::AddRealServer {
                        service: *key,
                        real: *real,
                        weight: state.weight,
                    }),
                    Some(existing) if existing.weight != state.weight => ops.push(IpvsOp::UpdateRealServer {
                        service: *key,
                        real: *real,
                        weight: state.weight,
                    }),
                    Some(_) => {}
                }
            }
            for (real, state) in &have.real_servers {
                if want.real_servers.contains_key(real) {
                    continue;
                }
                if key.protocol == Protocol::Tcp && state.has_connections() {
                    if state.weight != 0 {
                        ops.push(IpvsOp::UpdateRealServer {
                            service: *key,
                            real: *real,
                            weight: 0,
                        });
                    }
                } else {
                    ops.push(IpvsOp::DeleteRealServer {
                        service: *key,
                        real: *real,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
