//! IPVS: the kernel's table model (shared by the planner, the diff and the netlink edge), and the
//! planner that decides what one node's table must hold.
//!
//! Planning follows kube-proxy (pkg/proxy/serviceport.go, endpointslicecache.go, topology.go)
//! with one deliberate difference: a virtual server with no eligible endpoint is still planned,
//! with no real servers, so its traffic is dropped. kube-proxy's IPVS mode instead falls back to
//! cluster-wide endpoints for `externalTrafficPolicy: Local` with no local endpoint, whose replies
//! are then lost because the client address was kept; the iptables and nftables modes drop, and
//! so does portpolicy.
//!
//! The planner in parts, along kube-proxy's lines: `model` reads Services and EndpointSlices
//! once, `topology` picks the endpoints of a Service port, `service_rules` plans one Service,
//! `claims` decides which Service wins a virtual server two of them plan, and `tracker` keeps
//! every Service's result and the slices indexed by Service, so a slice change re-plans one
//! Service and touches only its virtual servers. [`node_rules`] runs the same planner once over a
//! snapshot.

mod claims;
pub mod diff;
pub mod listing;
mod model;
mod rules;
mod service_rules;
pub mod stale_flows;
pub mod table;
mod topology;
mod tracker;

pub use rules::{
    HealthCheckRule, NodePortAddresses, NodeRules, ProxyConfig, ProxyMode, TopologyMode, VirtualServerKind,
    VirtualServerRule,
};
pub use stale_flows::{StaleFlows, stale_udp_flows};
pub use table::{IpvsOp, IpvsService, IpvsTable, RealServerKey, RealServerState, VirtualServerKey};
pub use tracker::{RuleTracker, node_rules};

#[cfg(test)]
mod tests;
