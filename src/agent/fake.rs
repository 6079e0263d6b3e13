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
use super::nft::NftError;

/// The state of the fake kernel; tests reach in through [`FakeDataplane::state`].
#[derive(Clone, Debug, Default)]
pub struct FakeKernel {
    pub table: IpvsTable,
    /// The dummy interface's addresses.
    pub addresses: BTreeSet<IpAddr>,
    /// Addresses the node's other interfaces hold.
    pub host_addresses: BTreeSet<IpAddr>,
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
    /// Every `nft -f` transaction sent, and how many of them deleted and recreated a table.
    pub ruleset_writes: usize,
    pub table_replacements: usize,
    /// The agent's nftables sets as the transactions so far left them.
    pub nft: FakeNft,
    /// Refuse `nft -f` transactions while set.
    pub fail_nft: bool,
    /// Addresses added or removed, one each.
    pub address_changes: usize,
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

    fn host_addresses(&mut self) -> Result<BTreeSet<IpAddr>, DataplaneError> {
        let k = self.state();
        Ok(k.addresses.union(&k.host_addresses).copied().collect())
    }

    fn change_addresses(
        &mut self,
        add: &BTreeSet<IpAddr>,
        remove: &BTreeSet<IpAddr>,
    ) -> Result<(), DataplaneError> {
        let mut k = self.state();
        k.address_changes += add.len() + remove.len();
        k.addresses.extend(add);
        k.addresses.retain(|a| !remove.contains(a));
        Ok(())
    }

    fn apply_ruleset(&mut self, ruleset: &str) -> Result<(), DataplaneError> {
        let mut k = self.state();
        k.ruleset = Some(ruleset.to_string());
        k.ruleset_writes += 1;
        if k.fail_nft {
            return Err(NftError::Refused {
                status: std::process::ExitStatus::default(),
                stderr: "injected failure".into(),
            }
            .into());
        }
        // All or nothing, as nft applies a transaction: on a copy when it touches tables or
        // flushes sets; element changes alone are undone one by one instead, so the fake
        // kernel's cost for a small batch stays small too, as the real kernel's does.
        let outcome = if ruleset.contains("table ") || ruleset.contains("flush ") {
            let mut nft = k.nft.clone();
            let outcome = nft.run(ruleset);
            if outcome.is_ok() {
                k.nft = nft;
            }
            outcome
        } else {
            k.nft.run_elements(ruleset).map(|()| 0)
        };
        match outcome {
            Ok(replaced) => {
                k.table_replacements += replaced;
                Ok(())
            }
            Err(why) => Err(NftError::Refused {
                status: std::process::ExitStatus::default(),
                stderr: why,
            }
            .into()),
        }
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

/// The part of nftables the agent's transactions use: tables, their sets and the sets'
/// elements, interpreted from the text `nft -f` would read. Chains and rules are skipped (the
/// ruleset's own tests check their text; the VM suite runs them in the real kernel). Strict
/// where nft is: a `delete element` of an element not there, or an element for a set or table
/// that does not exist, fails the whole transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeNft {
    /// Sets by "family table set" (`ip portpolicy hairpin`), with their elements.
    pub sets: std::collections::BTreeMap<String, BTreeSet<String>>,
    pub tables: BTreeSet<String>,
}

impl FakeNft {
    /// The sets a ruleset text leaves when run on nothing.
    pub fn from_ruleset(text: &str) -> Result<Self, String> {
        let mut nft = FakeNft::default();
        nft.run(text)?;
        Ok(nft)
    }

    /// Runs a transaction of `add element` / `delete element` lines in place, undoing what it
    /// did when one of them fails.
    fn run_elements(&mut self, text: &str) -> Result<(), String> {
        let mut done: Vec<(String, String, bool)> = Vec::new();
        let mut outcome = Ok(());
        'lines: for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let words: Vec<&str> = line.splitn(6, ' ').collect();
            let (added, key) = match words.as_slice() {
                [verb @ ("add" | "delete"), "element", family, name, set_name, _] => {
                    (*verb == "add", format!("{family} {name} {set_name}"))
                }
                _ => {
                    outcome = Err(format!("not an element change: {line}"));
                    break;
                }
            };
            let list = line.split_once('{').map_or("", |(_, l)| l);
            let Some(members) = self.sets.get_mut(&key) else {
                outcome = Err(format!("no set {key}"));
                break;
            };
            for element in list
                .trim()
                .trim_end_matches('}')
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
            {
                if added {
                    if members.insert(element.to_string()) {
                        done.push((key.clone(), element.to_string(), true));
                    }
                } else if members.remove(element) {
                    done.push((key.clone(), element.to_string(), false));
                } else {
                    outcome = Err(format!("delete element {key} {{ {element} }}: no such element"));
                    break 'lines;
                }
            }
        }
        if outcome.is_err() {
            for (key, element, added) in done.into_iter().rev() {
                let members = self.sets.entry(key).or_default();
                if added {
                    members.remove(&element);
                } else {
                    members.insert(element);
                }
            }
        }
        outcome
    }

    /// Runs one transaction; returns how many tables it deleted.
    fn run(&mut self, text: &str) -> Result<usize, String> {
        fn elements(list: &str) -> impl Iterator<Item = String> + '_ {
            list.trim()
                .trim_start_matches('{')
                .trim_end_matches('}')
                .split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(str::to_string)
        }
        let mut replaced = 0;
        let mut table: Option<String> = None;
        let mut set: Option<String> = None;
        let mut open: Vec<&str> = Vec::new();
        for line in text.lines().map(str::trim) {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["add", "table", family, name] => {
                    self.tables.insert(format!("{family} {name}"));
                }
                ["delete", "table", family, name] => {
                    let name = format!("{family} {name}");
                    if !self.tables.remove(&name) {
                        return Err(format!("delete table {name}: no such table"));
                    }
                    self.sets.retain(|set, _| !set.starts_with(&format!("{name} ")));
                    replaced += 1;
                }
                ["table", family, name, "{"] => {
                    let name = format!("{family} {name}");
                    self.tables.insert(name.clone());
                    table = Some(name);
                    open.push("table");
                }
                ["set", name, "{"] => {
                    let table = table.as_ref().ok_or("set outside a table")?;
                    let name = format!("{table} {name}");
                    self.sets.entry(name.clone()).or_default();
                    set = Some(name);
                    open.push("set");
                }
                ["elements", "=", ..] => {
                    let set = set.as_ref().ok_or("elements outside a set")?;
                    let list = line.split_once('=').map_or("", |(_, l)| l);
                    self.sets.entry(set.clone()).or_default().extend(elements(list));
                }
                ["flush", "set", family, name, set_name] => {
                    let key = format!("{family} {name} {set_name}");
                    let Some(members) = self.sets.get_mut(&key) else {
                        return Err(format!("flush set: no set {key}"));
                    };
                    members.clear();
                }
                ["chain", ..] => open.push("chain"),
                ["}"] => match open.pop() {
                    Some("set") => set = None,
                    Some("table") => table = None,
                    _ => {}
                },
                [verb @ ("add" | "delete"), "element", family, name, set_name, ..] => {
                    let key = format!("{family} {name} {set_name}");
                    let list = line.split_once('{').map_or("", |(_, l)| l);
                    let Some(members) = self.sets.get_mut(&key) else {
                        return Err(format!("{verb} element: no set {key}"));
                    };
                    for element in elements(list) {
                        if *verb == "add" {
                            members.insert(element);
                        } else if !members.remove(&element) {
                            return Err(format!("delete element {key} {{ {element} }}: no such element"));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(replaced)
    }
}
