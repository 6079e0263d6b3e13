//! The node's kernel as the agent sees it: IPVS, the dummy interface's addresses, nftables and
//! a few `/proc/sys` settings. The sync loop only talks to this trait, so it is tested against
//! [`FakeDataplane`], an in-memory kernel built on [`IpvsOp::apply_to`].

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use portpolicy_core::ipvs::table::ApplyRefusal;
use portpolicy_core::ipvs::{IpvsOp, IpvsTable, RealServerKey, StaleFlows, VirtualServerKey};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("reading the IPVS table: {0}")]
    Dump(String),
    #[error("syncing addresses on {interface}: {message}")]
    Addresses { interface: String, message: String },
    #[error("applying the nftables ruleset: {0}")]
    Nftables(String),
    #[error("kernel settings: {0}")]
    Sysctl(String),
    #[error("clearing connection tracking entries: {0}")]
    Conntrack(String),
}

/// What applying a batch of operations did: every operation was attempted, and the ones the
/// kernel refused are listed (index into the batch, and why).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub failures: Vec<(usize, String)>,
}

impl ApplyReport {
    pub fn succeeded(&self) -> bool {
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
    /// Makes the dummy interface hold exactly these addresses (creating it if needed).
    fn sync_addresses(&mut self, addresses: &BTreeSet<IpAddr>) -> Result<(), DataplaneError>;
    /// Replaces the agent's nftables tables with this batch, atomically.
    fn apply_ruleset(&mut self, ruleset: &str) -> Result<(), DataplaneError>;
    /// Keeps the node ports out of the ephemeral port range; never drops others' reservations.
    fn reserve_ports(&mut self, ports: &BTreeSet<u16>) -> Result<(), DataplaneError>;
    /// Sets the sysctls IPVS proxying needs.
    fn ensure_sysctls(&mut self) -> Result<(), DataplaneError>;
    /// Deletes the connection-tracking entries of these UDP flows; returns how many went.
    fn clear_flows(&mut self, flows: &[StaleFlows]) -> Result<usize, DataplaneError>;
}

/// The state of the fake kernel; tests reach in through [`FakeDataplane::state`].
#[derive(Clone, Debug, Default)]
pub struct FakeKernel {
    pub table: IpvsTable,
    pub addresses: BTreeSet<IpAddr>,
    pub ruleset: Option<String>,
    pub reserved_ports: BTreeSet<u16>,
    pub sysctls_set: bool,
    /// Every batch of flows the agent asked to clear, in order.
    pub cleared_flows: Vec<Vec<StaleFlows>>,
    /// Make clearing flows fail while set.
    pub fail_clearing_flows: bool,
    /// Every operation the agent sent, in order, whether or not it succeeded.
    pub ops_log: Vec<IpvsOp>,
    pub dumps: usize,
    pub ruleset_writes: usize,
    /// Refuse this many upcoming operations (a transient kernel error).
    pub fail_next_ops: usize,
    /// Make dumps fail while set.
    pub fail_dump: bool,
}

impl FakeKernel {
    /// Sets a real server's connection counters, as live traffic would.
    pub fn set_connections(&mut self, service: &VirtualServerKey, real: &RealServerKey, active: u32) {
        if let Some(state) = self
            .table
            .get_mut(service)
            .and_then(|s| s.real_servers.get_mut(real))
        {
            state.active_connections = active;
        }
    }
}

/// An in-memory kernel. Cloning shares the state.
#[derive(Clone, Debug, Default)]
pub struct FakeDataplane {
    state: Arc<Mutex<FakeKernel>>,
}

impl FakeDataplane {
    pub fn new(kernel: FakeKernel) -> Self {
        FakeDataplane {
            state: Arc::new(Mutex::new(kernel)),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, FakeKernel> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Dataplane for FakeDataplane {
    fn dump(&mut self) -> Result<IpvsTable, DataplaneError> {
        let mut k = self.state();
        k.dumps += 1;
        if k.fail_dump {
            return Err(DataplaneError::Dump("injected failure".into()));
        }
        Ok(k.table.clone())
    }

    fn apply(&mut self, ops: &[IpvsOp]) -> ApplyReport {
        let mut k = self.state();
        let mut report = ApplyReport::default();
        for (i, op) in ops.iter().enumerate() {
            k.ops_log.push(op.clone());
            if k.fail_next_ops > 0 {
                k.fail_next_ops -= 1;
                report.failures.push((i, format!("{op}: injected failure")));
                continue;
            }
            if let Err(refusal) = op.apply_to(&mut k.table) {
                let why = match refusal {
                    ApplyRefusal::Exists => "exists",
                    ApplyRefusal::NotFound => "not found",
                };
                report.failures.push((i, format!("{op}: {why}")));
            }
        }
        report
    }

    fn addresses(&mut self) -> Result<BTreeSet<IpAddr>, DataplaneError> {
        Ok(self.state().addresses.clone())
    }

    fn sync_addresses(&mut self, addresses: &BTreeSet<IpAddr>) -> Result<(), DataplaneError> {
        self.state().addresses = addresses.clone();
        Ok(())
    }

    fn apply_ruleset(&mut self, ruleset: &str) -> Result<(), DataplaneError> {
        let mut k = self.state();
        k.ruleset = Some(ruleset.to_string());
        k.ruleset_writes += 1;
        Ok(())
    }

    fn reserve_ports(&mut self, ports: &BTreeSet<u16>) -> Result<(), DataplaneError> {
        self.state().reserved_ports = ports.clone();
        Ok(())
    }

    fn ensure_sysctls(&mut self) -> Result<(), DataplaneError> {
        self.state().sysctls_set = true;
        Ok(())
    }

    fn clear_flows(&mut self, flows: &[StaleFlows]) -> Result<usize, DataplaneError> {
        let mut k = self.state();
        if k.fail_clearing_flows {
            return Err(DataplaneError::Conntrack("injected failure".into()));
        }
        k.cleared_flows.push(flows.to_vec());
        Ok(flows.len())
    }
}
