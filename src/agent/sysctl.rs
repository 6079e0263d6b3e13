//! Kernel settings the agent needs, written through `/proc/sys`.
//!
//! `ip_local_reserved_ports` is shared with everyone else on the node, so the agent only adds
//! the node ports it serves and only takes back ports it added itself.

use std::collections::BTreeSet;
use std::path::PathBuf;

/// The settings IPVS proxying needs, as kube-proxy sets them.
pub(crate) const IPVS_SYSCTLS: [(&str, &str); 4] = [
    ("net/ipv4/ip_forward", "1"),
    // Lets netfilter (masquerading) see connections IPVS forwards.
    ("net/ipv4/vs/conntrack", "1"),
    // Drops packets of connections whose real server was removed, so clients reconnect.
    ("net/ipv4/vs/expire_nodest_conn", "1"),
    // Expires persistence templates of quiesced (weight 0) real servers.
    ("net/ipv4/vs/expire_quiescent_template", "1"),
];

/// Strict ARP (`--ipvs-strict-arp`), as kube-proxy sets it: answer ARP only for addresses on
/// the interface asked (so the VIPs on the dummy interface are never announced from the node's
/// real interfaces), and announce with the best local address for the target. What MetalLB's
/// L2 mode and kube-vip ask of IPVS nodes.
pub(crate) const STRICT_ARP_SYSCTLS: [(&str, &str); 2] = [
    ("net/ipv4/conf/all/arp_ignore", "1"),
    ("net/ipv4/conf/all/arp_announce", "2"),
];

/// Every sysctl the agent sets, with its value.
pub(crate) fn wanted_sysctls(strict_arp: bool) -> Vec<(&'static str, &'static str)> {
    let mut wanted = IPVS_SYSCTLS.to_vec();
    if strict_arp {
        wanted.extend(STRICT_ARP_SYSCTLS);
    }
    wanted
}

pub(crate) const RESERVED_PORTS: &str = "net/ipv4/ip_local_reserved_ports";

#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds {text:?}, which is not a port list")]
    Parse { path: PathBuf, text: String },
}

/// `/proc/sys`, or a directory standing in for it in tests.
#[derive(Clone, Debug)]
pub(crate) struct Sysctls {
    root: PathBuf,
}

impl Default for Sysctls {
    fn default() -> Self {
        Sysctls::at("/proc/sys")
    }
}

impl Sysctls {
    pub(crate) fn at(root: impl Into<PathBuf>) -> Self {
        Sysctls { root: root.into() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub(crate) fn read(&self, name: &str) -> Result<String, SysctlError> {
        let path = self.path(name);
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_string())
            .map_err(|source| SysctlError::Read { path, source })
    }

    /// Writes only when the value differs, so a steady state writes nothing.
    pub(crate) fn ensure(&self, name: &str, value: &str) -> Result<bool, SysctlError> {
        if self.read(name).ok().as_deref() == Some(value) {
            return Ok(false);
        }
        let path = self.path(name);
        std::fs::write(&path, value).map_err(|source| SysctlError::Write {
            path,
            value: value.to_string(),
            source,
        })?;
        Ok(true)
    }

    /// Reserves `wanted` in `ip_local_reserved_ports`, releasing only ports in `added_by_us`
    /// that are no longer wanted. Returns the ports the agent now holds on its own account.
    pub(crate) fn reserve_ports(
        &self,
        wanted: &BTreeSet<u16>,
        added_by_us: &BTreeSet<u16>,
    ) -> Result<BTreeSet<u16>, SysctlError> {
        let text = self.read(RESERVED_PORTS)?;
        let existing = parse_port_list(&text).ok_or_else(|| SysctlError::Parse {
            path: self.path(RESERVED_PORTS),
            text: text.clone(),
        })?;
        let (merged, ours) = merge_reserved_ports(&existing, wanted, added_by_us);
        if merged != existing {
            self.ensure(RESERVED_PORTS, &format_port_list(&merged))?;
        }
        Ok(ours)
    }
}

/// Pure merge: everything that was there stays, except ports the agent added earlier and no
/// longer wants; wanted ports are added. The second result is what the agent added (wanted
/// ports that were not already reserved by someone else, plus those it already held).
pub(crate) fn merge_reserved_ports(
    existing: &BTreeSet<u16>,
    wanted: &BTreeSet<u16>,
    added_by_us: &BTreeSet<u16>,
) -> (BTreeSet<u16>, BTreeSet<u16>) {
    let released: BTreeSet<u16> = added_by_us.difference(wanted).copied().collect();
    let mut merged: BTreeSet<u16> = existing.difference(&released).copied().collect();
    let ours: BTreeSet<u16> = wanted
        .iter()
        .filter(|p| !existing.contains(p) || added_by_us.contains(p))
        .copied()
        .collect();
    merged.extend(wanted);
    (merged, ours)
}

/// Parses the kernel's `1000,2000-2005` format (also accepts blanks and an empty list).
pub(crate) fn parse_port_list(text: &str) -> Option<BTreeSet<u16>> {
    let mut ports = BTreeSet::new();
    for item in text.split([',', ' ', '\t', '\n']).filter(|s| !s.is_empty()) {
        match item.split_once('-') {
            Some((low, high)) => {
                let (low, high): (u16, u16) = (low.parse().ok()?, high.parse().ok()?);
                if low > high {
                    return None;
                }
                ports.extend(low..=high);
            }
            None => {
                ports.insert(item.parse().ok()?);
            }
        }
    }
    Some(ports)
}

/// Writes ports back in the kernel's compact format, runs as `low-high`.
pub(crate) fn format_port_list(ports: &BTreeSet<u16>) -> String {
    let mut runs: Vec<(u16, u16)> = Vec::new();
    for &p in ports {
        match runs.last_mut() {
            Some((_, high)) if u32::from(*high) + 1 == u32::from(p) => *high = p,
            _ => runs.push((p, p)),
        }
    }
    runs.iter()
        .map(|&(l, h)| if l == h { l.to_string() } else { format!("{l}-{h}") })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ports: &[u16]) -> BTreeSet<u16> {
        ports.iter().copied().collect()
    }

    #[test]
    fn strict_arp_adds_kube_proxys_two_settings_and_writes_them() {
        assert_eq!(wanted_sysctls(false), IPVS_SYSCTLS);
        let strict = wanted_sysctls(true);
        assert_eq!(strict.len(), IPVS_SYSCTLS.len() + 2);
        assert!(strict.contains(&("net/ipv4/conf/all/arp_ignore", "1")));
        assert!(strict.contains(&("net/ipv4/conf/all/arp_announce", "2")));

        let dir = std::env::temp_dir().join(format!("portpolicy-arp-{}", std::process::id()));
        let conf = dir.join("net/ipv4/conf/all");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("arp_ignore"), "0\n").unwrap();
        std::fs::write(conf.join("arp_announce"), "2\n").unwrap();
        let sysctls = Sysctls::at(&dir);
        let written: Vec<bool> = STRICT_ARP_SYSCTLS
            .iter()
            .map(|(name, value)| sysctls.ensure(name, value).unwrap())
            .collect();
        assert_eq!(written, [true, false], "only the value that differs is written");
        assert_eq!(std::fs::read_to_string(conf.join("arp_ignore")).unwrap(), "1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn port_lists_round_trip_in_the_kernel_format() {
        let ports = parse_port_list("8080,30000-30003,30005\n").unwrap();
        assert_eq!(ports, set(&[8080, 30000, 30001, 30002, 30003, 30005]));
        assert_eq!(format_port_list(&ports), "8080,30000-30003,30005");
        assert_eq!(parse_port_list("").unwrap(), set(&[]));
        assert_eq!(format_port_list(&set(&[])), "");
        assert_eq!(format_port_list(&set(&[65534, 65535])), "65534-65535");
        assert!(parse_port_list("30005-30000").is_none());
        assert!(parse_port_list("http").is_none());
    }

    #[test]
    fn merge_adds_ours_and_never_removes_others_entries() {
        let existing = set(&[22, 8080, 30080]);
        // 30080 was reserved by someone else before the agent wanted it.
        let (merged, ours) = merge_reserved_ports(&existing, &set(&[30080, 30081]), &set(&[]));
        assert_eq!(merged, set(&[22, 8080, 30080, 30081]));
        assert_eq!(ours, set(&[30081]));
        // Both node ports go away: only the one the agent added is released.
        let (merged, ours) = merge_reserved_ports(&merged, &set(&[]), &ours);
        assert_eq!(merged, set(&[22, 8080, 30080]));
        assert_eq!(ours, set(&[]));
    }

    #[test]
    fn reserve_ports_writes_only_on_change() {
        let dir = std::env::temp_dir().join(format!("portpolicy-sysctl-{}", std::process::id()));
        let file = dir.join(RESERVED_PORTS);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "22,30000-30001\n").unwrap();
        let sysctls = Sysctls::at(&dir);
        let ours = sysctls
            .reserve_ports(&set(&[30001, 30002, 30003]), &set(&[]))
            .unwrap();
        assert_eq!(ours, set(&[30002, 30003]));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "22,30000-30003");
        let ours = sysctls.reserve_ports(&set(&[30002]), &ours).unwrap();
        assert_eq!(ours, set(&[30002]));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "22,30000-30002");
        assert!(!sysctls.ensure(RESERVED_PORTS, "22,30000-30002").unwrap());
        assert!(sysctls.ensure(RESERVED_PORTS, "22").unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
