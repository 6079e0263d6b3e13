//! Endpoint selection: which endpoints serve a Service port on this node (kube-proxy's
//! topology.go, CategorizeEndpoints and topologyModeFromHints, and the de-duplication of its
//! EndpointSliceCache).
//!
//! Topology comes from the endpoints' hints alone, as in kube-proxy since 1.33: the EndpointSlice
//! controller writes them for `service.kubernetes.io/topology-mode: Auto` and for
//! `spec.trafficDistribution`, and the proxy follows them without reading the Service's request.
//! Hints narrow only the Cluster-policy endpoints; Local-policy traffic ignores them.

use std::sync::Arc;

use super::model::{Hint, ServicePortInfo, SliceModel};
use super::rules::{REAL_SERVER_WEIGHT, TopologyMode};
use super::table::RealServerKey;

/// Real servers with their weights, as a plan lists them.
pub(super) type RealServers = Arc<[(RealServerKey, u32)]>;

/// An endpoint serving one Service port, after de-duplication across slices.
#[derive(Clone, Copy, Debug)]
pub(super) struct Candidate {
    real: RealServerKey,
    local: bool,
    ready: bool,
    serving_terminating: bool,
    node_hint: Hint,
    zone_hint: Hint,
    /// Position across the slices, which decides between two listings of one endpoint.
    listing: usize,
}

/// The endpoints chosen for one kind of traffic, and the hints that narrowed them.
#[derive(Clone, Debug)]
pub(super) struct Chosen {
    pub(super) real_servers: RealServers,
    pub(super) topology: Option<TopologyMode>,
}

/// Cluster or local endpoints of one address family, chosen the way kube-proxy's
/// CategorizeEndpoints does: ready ones (for Cluster traffic, only those the hints give this
/// node, if the hints may be used), or if there are none, serving-and-terminating ones,
/// whatever their hints.
pub(super) fn choose_endpoints(candidates: &[Candidate], ipv4: bool, local_only: bool) -> Chosen {
    let pool = || {
        candidates
            .iter()
            .filter(move |c| c.real.address.is_ipv4() == ipv4 && (!local_only || c.local))
    };
    let topology = if local_only { None } else { topology_mode(pool()) };
    let pick = |keep: &dyn Fn(&Candidate) -> bool| -> Vec<(RealServerKey, u32)> {
        pool()
            .filter(|c| keep(c))
            .map(|c| (c.real, REAL_SERVER_WEIGHT))
            .collect()
    };
    let ready = pick(&|c| c.ready && available_for(c, topology));
    if !ready.is_empty() {
        return Chosen {
            real_servers: ready.into(),
            topology,
        };
    }
    // Only reached when nothing is ready at all: a mode is only chosen when some ready
    // endpoint is hinted here.
    Chosen {
        real_servers: pick(&|c| c.serving_terminating).into(),
        topology: None,
    }
}

/// kube-proxy's topologyModeFromHints over one family's endpoints. Only ready endpoints count:
/// node hints are used when every one has node hints and one is hinted for this node; else
/// zone hints, when every one has zone hints and one is hinted for this node's zone (never
/// for a node without a zone label); else none.
fn topology_mode<'a>(candidates: impl Iterator<Item = &'a Candidate>) -> Option<TopologyMode> {
    let mut any_ready = false;
    let (mut all_node_hints, mut node_here) = (true, false);
    let (mut all_zone_hints, mut zone_here) = (true, false);
    for candidate in candidates.filter(|c| c.ready) {
        any_ready = true;
        all_node_hints &= candidate.node_hint != Hint::Absent;
        node_here |= candidate.node_hint == Hint::Here;
        all_zone_hints &= candidate.zone_hint != Hint::Absent;
        zone_here |= candidate.zone_hint == Hint::Here;
    }
    if !any_ready {
        None
    } else if all_node_hints && node_here {
        Some(TopologyMode::PreferSameNode)
    } else if all_zone_hints && zone_here {
        Some(TopologyMode::PreferSameZone)
    } else {
        None
    }
}

fn available_for(candidate: &Candidate, topology: Option<TopologyMode>) -> bool {
    match topology {
        None => true,
        Some(TopologyMode::PreferSameNode) => candidate.node_hint == Hint::Here,
        Some(TopologyMode::PreferSameZone) => candidate.zone_hint == Hint::Here,
    }
}

/// Endpoints of one Service port across its slices (`slices` in slice-name order), sorted by
/// real server, with their zone hints judged against `zone` (this node's zone label). An
/// endpoint listed by two slices counts once: the first listing wins, except that a listing on
/// this node beats one elsewhere (as kube-proxy's EndpointSliceCache does).
pub(super) fn candidates_for_port(
    port: &ServicePortInfo,
    slices: &[SliceModel],
    zone: Option<&str>,
) -> Vec<Candidate> {
    let mut listed: Vec<Candidate> = Vec::with_capacity(slices.iter().map(|s| s.endpoints.len()).sum());
    for slice in slices {
        if slice.ipv4.is_none() {
            continue;
        }
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| *p.name == *port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        let zone_bit = slice.zone_bit(zone);
        for ep in &slice.endpoints {
            let zone_hint = if ep.zone_hints == 0 {
                Hint::Absent
            } else if ep.zone_hints & zone_bit != 0 {
                Hint::Here
            } else {
                Hint::Elsewhere
            };
            listed.push(Candidate {
                real: RealServerKey {
                    address: ep.address,
                    port: slice_port.port,
                },
                local: ep.local,
                ready: ep.ready,
                serving_terminating: ep.serving && ep.terminating,
                node_hint: ep.node_hint,
                zone_hint,
                listing: listed.len(),
            });
        }
    }
    listed.sort_unstable_by(|a, b| {
        a.real
            .cmp(&b.real)
            .then(b.local.cmp(&a.local))
            .then(a.listing.cmp(&b.listing))
    });
    listed.dedup_by(|later, first| later.real == first.real);
    listed
}
