//! The real dataplane: IPVS and the dummy interface over netlink, nftables through `nft -f -`,
//! and `/proc/sys`.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use super::dataplane::{ApplyReport, Dataplane, DataplaneError};
use super::nft::NftError;
use super::sysctl::{Sysctls, wanted_sysctls};
use portpolicy_core::ipvs::{IpvsOp, IpvsTable, StaleFlows};
use portpolicy_netlink::conntrack::FlowFilter;
use portpolicy_netlink::{ConntrackHandle, DummyLink, IpvsHandle, NetlinkError};

pub(super) struct LinuxDataplane {
    ipvs: IpvsHandle,
    link: DummyLink,
    interface: String,
    sysctls: Sysctls,
    strict_arp: bool,
    /// Node ports this process added to `ip_local_reserved_ports` (others' entries are kept).
    reserved_by_us: BTreeSet<u16>,
    /// Opened when first needed: a node without ctnetlink still gets its IPVS rules.
    conntrack: Option<ConntrackHandle>,
}

impl LinuxDataplane {
    /// Opens the IPVS family and finds (or creates) the dummy interface. `strict_arp` adds
    /// kube-proxy's `--ipvs-strict-arp` settings to the sysctls.
    pub(super) fn open(
        interface: &str,
        sysctl_root: &std::path::Path,
        strict_arp: bool,
    ) -> Result<Self, DataplaneError> {
        let ipvs = IpvsHandle::open().map_err(DataplaneError::OpenIpvs)?;
        let link = DummyLink::ensure(interface).map_err(|source| DataplaneError::Addresses {
            interface: interface.to_string(),
            source,
        })?;
        Ok(LinuxDataplane {
            ipvs,
            link,
            interface: interface.to_string(),
            sysctls: Sysctls::at(sysctl_root),
            strict_arp,
            reserved_by_us: BTreeSet::new(),
            conntrack: None,
        })
    }

    fn address_error(&self, source: NetlinkError) -> DataplaneError {
        DataplaneError::Addresses {
            interface: self.interface.clone(),
            source,
        }
    }
}

impl Dataplane for LinuxDataplane {
    fn dump(&mut self) -> Result<IpvsTable, DataplaneError> {
        self.ipvs.dump().map_err(DataplaneError::Dump)
    }

    fn apply(&mut self, ops: &[IpvsOp]) -> ApplyReport {
        if ops.is_empty() {
            return ApplyReport::default();
        }
        let outcome = self.ipvs.apply(ops);
        // The outcome names refused operations; map them back to their place in the batch.
        let mut failures = Vec::new();
        let mut from = 0;
        for (op, err) in outcome.failed {
            let index = ops[from..]
                .iter()
                .position(|o| *o == op)
                .map_or(from, |i| from + i);
            from = index + 1;
            failures.push((index, err));
        }
        ApplyReport { failures }
    }

    fn addresses(&mut self) -> Result<BTreeSet<IpAddr>, DataplaneError> {
        self.link.addresses().map_err(|e| self.address_error(e))
    }

    fn host_addresses(&mut self) -> Result<BTreeSet<IpAddr>, DataplaneError> {
        self.link.host_addresses().map_err(|e| self.address_error(e))
    }

    fn change_addresses(
        &mut self,
        add: &BTreeSet<IpAddr>,
        remove: &BTreeSet<IpAddr>,
    ) -> Result<(), DataplaneError> {
        match self.link.change_addresses(add, remove) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.address_error(e)),
        }
    }

    fn apply_ruleset(&mut self, ruleset: &str) -> Result<(), DataplaneError> {
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(NftError::Spawn)?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(ruleset.as_bytes()).map_err(NftError::Write)?;
        }
        let output = child.wait_with_output().map_err(NftError::Wait)?;
        if output.status.success() {
            Ok(())
        } else {
            Err(NftError::Refused {
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            }
            .into())
        }
    }

    fn reserve_ports(&mut self, ports: &BTreeSet<u16>) -> Result<(), DataplaneError> {
        self.reserved_by_us = self.sysctls.reserve_ports(ports, &self.reserved_by_us)?;
        Ok(())
    }

    fn ensure_sysctls(&mut self) -> Result<(), DataplaneError> {
        let mut errors = Vec::new();
        for (name, value) in wanted_sysctls(self.strict_arp) {
            match self.sysctls.ensure(name, value) {
                Ok(true) => tracing::info!(sysctl = name, value, "set"),
                Ok(false) => {}
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(DataplaneError::Sysctl(errors))
        }
    }

    fn clear_flows(&mut self, flows: &[StaleFlows]) -> Result<usize, DataplaneError> {
        let handle = match &mut self.conntrack {
            Some(handle) => handle,
            None => self
                .conntrack
                .insert(ConntrackHandle::open().map_err(DataplaneError::Conntrack)?),
        };
        let result = handle
            .delete_matching(&FlowFilter::new(flows))
            .map_err(DataplaneError::Conntrack);
        if result.is_err() {
            // A socket in an unknown state (a half-read dump) is not reused.
            self.conntrack = None;
        }
        result
    }
}
