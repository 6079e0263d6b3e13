//! An in-memory kernel for the sync loop's tests and benchmarks, built on
//! [`IpvsOp::apply_to`]: it refuses what the kernel would refuse, with the kernel's errnos.
//! Never in a production build: only for tests and with the `test-util` feature.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use portpolicy_core::ipvs::table::ApplyRefusal;
use portpolicy_core::ipvs::{IpvsOp, IpvsTable, RealServerKey, StaleFlows, VirtualServerKey};
use portpolicy_netlink::{NetlinkError, errno};

use super::dataplane::{ApplyReport, Dataplane, DataplaneError};

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
            let error = std::io::Error::other("injected failure");
            return Err(DataplaneError::Dump(NetlinkError::Io(error)));
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
                report.failures.push((i, NetlinkError::kernel(op, errno::EIO)));
                continue;
            }
            // Refused as the kernel refuses it.
            if let Err(refusal) = op.apply_to(&mut k.table) {
                let errno = match refusal {
                    ApplyRefusal::Exists => errno::EEXIST,
                    ApplyRefusal::NotFound => errno::ENOENT,
                };
                report.failures.push((i, NetlinkError::kernel(op, errno)));
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
            let error = std::io::Error::other("injected failure");
            return Err(DataplaneError::Conntrack(NetlinkError::Io(error)));
        }
        k.cleared_flows.push(flows.to_vec());
        Ok(flows.len())
    }
}
