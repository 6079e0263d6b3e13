//! The node's kernel as the agent sees it: IPVS, the dummy interface's addresses, nftables and
//! a few `/proc/sys` settings. The sync loop only talks to this trait, so it is tested against
//! an in-memory kernel (`agent::fake`, built only for tests and with the `test-util` feature).

use std::collections::BTreeSet;
use std::net::IpAddr;

use portpolicy_core::ipvs::{IpvsOp, IpvsTable, StaleFlows};
use portpolicy_netlink::NetlinkError;

use super::nft::NftError;
use super::sysctl::SysctlError;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("opening IPVS: {0}")]
    OpenIpvs(#[source] NetlinkError),
    #[error("reading the IPVS table: {0}")]
    Dump(#[source] NetlinkError),
    #[error("syncing addresses on {interface}: {source}")]
    Addresses {
        interface: String,
        #[source]
        source: NetlinkError,
    },
    #[error("applying the nftables ruleset: {0}")]
    Nftables(#[from] NftError),
    #[error("kernel settings: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Sysctl(Vec<SysctlError>),
    #[error("clearing connection tracking entries: {0}")]
    Conntrack(#[source] NetlinkError),
}

impl DataplaneError {
    /// The netlink error underneath, when it was a netlink request that failed.
    pub(crate) fn netlink(&self) -> Option<&NetlinkError> {
        match self {
            DataplaneError::OpenIpvs(e) | DataplaneError::Dump(e) | DataplaneError::Conntrack(e) => Some(e),
            DataplaneError::Addresses { source, .. } => Some(source),
            DataplaneError::Nftables(_) | DataplaneError::Sysctl(_) => None,
        }
    }
}

impl From<SysctlError> for DataplaneError {
    fn from(error: SysctlError) -> Self {
        DataplaneError::Sysctl(vec![error])
    }
}

/// What applying a batch of operations did: every operation was attempted, and the ones the
/// kernel refused are listed (index into the batch, and the kernel's answer).
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub failures: Vec<(usize, NetlinkError)>,
}

impl ApplyReport {
    pub(crate) fn succeeded(&self) -> bool {
        self.failures.is_empty()
    }
}

/// The kernel edge. Methods are blocking; each either does all it can or reports why not.
pub trait Dataplane: Send {
    /// The whole IPVS table, connection counters included.
    fn dump(&mut self) -> Result<IpvsTable, DataplaneError>;
    /// Applies operations in order; a refused one does not stop the rest.
    fn apply(&mut self, ops: &[IpvsOp]) -> ApplyReport;
    /// Addresses currently bound on the agent's dummy interface.
    fn addresses(&mut self) -> Result<BTreeSet<IpAddr>, DataplaneError>;
    /// Every address any interface of the node holds, the dummy interface's included.
    fn host_addresses(&mut self) -> Result<BTreeSet<IpAddr>, DataplaneError>;
    /// Adds and removes addresses on the dummy interface; one already there (or already gone)
    /// counts as done.
    fn change_addresses(
        &mut self,
        add: &BTreeSet<IpAddr>,
        remove: &BTreeSet<IpAddr>,
    ) -> Result<(), DataplaneError>;
    /// Runs one `nft -f` transaction (the whole table, or set element changes), atomically.
    fn apply_ruleset(&mut self, ruleset: &str) -> Result<(), DataplaneError>;
    /// Keeps the node ports out of the ephemeral port range; never drops others' reservations.
    fn reserve_ports(&mut self, ports: &BTreeSet<u16>) -> Result<(), DataplaneError>;
    /// Sets the sysctls IPVS proxying needs.
    fn ensure_sysctls(&mut self) -> Result<(), DataplaneError>;
    /// Deletes the connection-tracking entries of these UDP flows; returns how many went.
    fn clear_flows(&mut self, flows: &[StaleFlows]) -> Result<usize, DataplaneError>;
}
