//! Endpoint selection: which endpoints serve a Service port on this node (kube-proxy's
//! topology.go and the de-duplication of its EndpointSliceCache).

use std::sync::Arc;

use super::model::{ServicePortInfo, SliceModel};
use super::rules::REAL_SERVER_WEIGHT;
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
    /// Position across the slices, which decides between two listings of one endpoint.
    listing: usize,
}

/// Cluster or local endpoints of one address family, chosen the way kube-proxy's
/// CategorizeEndpoints does: ready ones, or if there are none, serving-and-terminating ones.
pub(super) fn choose_endpoints(candidates: &[Candidate], ipv4: bool, local_only: bool) -> RealServers {
    let pool = || {
        candidates
            .iter()
            .filter(move |c| c.real.address.is_ipv4() == ipv4 && (!local_only || c.local))
    };
    let pick = |ready: bool| {
        let mut picked = Vec::with_capacity(candidates.len());
        picked.extend(
            pool()
                .filter(|c| if ready { c.ready } else { c.serving_terminating })
                .map(|c| (c.real, REAL_SERVER_WEIGHT)),
        );
        picked
    };
    let ready = pick(true);
    if ready.is_empty() {
        pick(false).into()
    } else {
        ready.into()
    }
}

/// Endpoints of one Service port across its slices (`slices` in slice-name order), sorted by
/// real server. An endpoint listed by two slices counts once: the first listing wins, except
/// that a listing on this node beats one elsewhere (as kube-proxy's EndpointSliceCache does).
pub(super) fn candidates_for_port(port: &ServicePortInfo, slices: &[SliceModel]) -> Vec<Candidate> {
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
        for ep in &slice.endpoints {
            listed.push(Candidate {
                real: RealServerKey {
                    address: ep.address,
                    port: slice_port.port,
                },
                local: ep.local,
                ready: ep.ready,
                serving_terminating: ep.serving && ep.terminating,
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
