//! The dummy interface that holds the virtual IPs, over rtnetlink (`linux/rtnetlink.h`).
//!
//! IPVS only sees traffic for addresses the node owns, so kube-proxy binds every cluster IP
//! to a dummy interface; portpolicy does the same with its own interface and never touches any
//! other one.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::NetlinkError;
use super::message::{MessageBuilder, NLM_F_CREATE, NLM_F_EXCL, attributes, read_str};
use super::socket::{DUMP, NetlinkSocket, REQUEST, REQUEST_ACK};

/// Interface names have at most 15 bytes (IFNAMSIZ with its NUL), so not `portpolicy-ipvs0`.
pub const DEFAULT_NAME: &str = "portpolicy-ipvs";

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;

const IFLA_IFNAME: u16 = 3;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFF_UP: u32 = 0x1;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_F_NODAD: u8 = 0x2;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;

const IFINFOMSG_LEN: usize = 16;
const IFADDRMSG_LEN: usize = 8;

/// A dummy interface owned by portpolicy, found by name (and created when missing).
pub struct DummyLink {
    socket: NetlinkSocket,
    name: String,
    index: u32,
}

/// What `RTM_GETLINK` says about an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub up: bool,
    pub kind: Option<String>,
}

impl DummyLink {
    /// Finds the interface, creating it up if missing, and brings it up if it is down.
    /// An interface of that name that is not a dummy is an error, never reused.
    pub fn ensure(name: &str) -> Result<Self, NetlinkError> {
        if name.is_empty() || name.len() > 15 {
            return Err(NetlinkError::InvalidRequest(format!(
                "interface name {name:?} must have 1 to 15 bytes"
            )));
        }
        let mut socket = NetlinkSocket::open(netlink_sys::protocols::NETLINK_ROUTE)?;
        let info = match get_link(&mut socket, name)? {
            Some(info) => info,
            None => {
                let mut create = MessageBuilder::new(RTM_NEWLINK, REQUEST_ACK | NLM_F_CREATE | NLM_F_EXCL);
                create.put_fixed(&ifinfomsg(0, IFF_UP, IFF_UP));
                create.put_str(IFLA_IFNAME, name);
                create
                    .begin_nest(IFLA_LINKINFO)
                    .put_str(IFLA_INFO_KIND, "dummy")
                    .end_nest();
                socket.request(create, &format_args!("create dummy interface {name}"))?;
                get_link(&mut socket, name)?.ok_or_else(|| {
                    NetlinkError::Protocol(format!("interface {name} missing right after its creation"))
                })?
            }
        };
        if info.kind.as_deref() != Some("dummy") {
            return Err(NetlinkError::InvalidRequest(format!(
                "interface {name} exists but is a {} interface, not dummy",
                info.kind.as_deref().unwrap_or("plain")
            )));
        }
        if !info.up {
            let mut up = MessageBuilder::new(RTM_NEWLINK, REQUEST_ACK);
            up.put_fixed(&ifinfomsg(info.index, IFF_UP, IFF_UP));
            socket.request(up, &format_args!("bring interface {name} up"))?;
        }
        Ok(DummyLink {
            socket,
            name: name.to_string(),
            index: info.index,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    /// The interface's addresses, leaving out link-local ones the kernel adds by itself.
    pub fn addresses(&mut self) -> Result<BTreeSet<IpAddr>, NetlinkError> {
        let what = format!("list addresses of {}", self.name);
        let entries = self.dump_addresses(&what)?;
        Ok(entries
            .into_iter()
            .filter(|entry| entry.index == self.index && entry.scope != RT_SCOPE_LINK)
            .map(|entry| entry.address)
            .collect())
    }

    /// Every address any interface of the host holds, of any scope (this interface's too):
    /// what tells a node port on an address the node has lost from one someone else serves.
    pub fn host_addresses(&mut self) -> Result<BTreeSet<IpAddr>, NetlinkError> {
        let entries = self.dump_addresses(&"list the host's addresses")?;
        Ok(entries.into_iter().map(|entry| entry.address).collect())
    }

    fn dump_addresses(&mut self, what: &dyn std::fmt::Display) -> Result<Vec<AddressEntry>, NetlinkError> {
        let mut request = MessageBuilder::new(RTM_GETADDR, DUMP);
        request.put_fixed(&ifaddrmsg(libc::AF_UNSPEC as u8, 0, 0, 0, 0));
        let replies = self.socket.dump(request, what)?;
        let mut entries = Vec::with_capacity(replies.len());
        for reply in replies {
            entries.extend(decode_address_entry(&reply)?);
        }
        Ok(entries)
    }

    /// Makes the interface hold exactly `desired` (as /32 and /128): adds the missing addresses,
    /// removes the others, and returns how many were (added, removed). Every change is tried even
    /// if one fails; the first refusal is returned.
    pub fn sync_addresses(&mut self, desired: &BTreeSet<IpAddr>) -> Result<(usize, usize), NetlinkError> {
        let current = self.addresses()?;
        let mut changes: Vec<(bool, IpAddr)> = desired.difference(&current).map(|a| (true, *a)).collect();
        changes.extend(current.difference(desired).map(|a| (false, *a)));
        self.apply_changes(&changes, false)
    }

    /// Adds and removes these addresses without listing the interface first: the caller knows
    /// what it holds. An address already there (or already gone) counts as done, so a model
    /// that lags the kernel converges instead of failing. Returns (added, removed) as
    /// [`DummyLink::sync_addresses`] does.
    pub fn change_addresses(
        &mut self,
        add: &BTreeSet<IpAddr>,
        remove: &BTreeSet<IpAddr>,
    ) -> Result<(usize, usize), NetlinkError> {
        let mut changes: Vec<(bool, IpAddr)> = add.iter().map(|a| (true, *a)).collect();
        changes.extend(remove.iter().map(|a| (false, *a)));
        self.apply_changes(&changes, true)
    }

    fn apply_changes(
        &mut self,
        changes: &[(bool, IpAddr)],
        tolerate_done: bool,
    ) -> Result<(usize, usize), NetlinkError> {
        if changes.is_empty() {
            return Ok((0, 0));
        }
        let builders = changes
            .iter()
            .map(|(add, address)| address_request(self.index, *add, *address))
            .collect();
        let (results, broken) = self.socket.batch(builders);
        if let Some(err) = broken {
            return Err(err);
        }
        let (mut added, mut removed, mut first_error) = (0, 0, None);
        for ((add, address), result) in changes.iter().zip(results) {
            match (result, add) {
                (Ok(()), true) => added += 1,
                (Ok(()), false) => removed += 1,
                (Err(errno), true) if tolerate_done && errno == libc::EEXIST => {}
                (Err(errno), false) if tolerate_done && errno == libc::EADDRNOTAVAIL => {}
                (Err(errno), _) => {
                    let verb = if *add { "add" } else { "remove" };
                    let rule = format_args!("{verb} address {address} on {}", self.name);
                    first_error.get_or_insert_with(|| NetlinkError::kernel(&rule, errno));
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok((added, removed)),
        }
    }
}

fn get_link(socket: &mut NetlinkSocket, name: &str) -> Result<Option<LinkInfo>, NetlinkError> {
    let mut request = MessageBuilder::new(RTM_GETLINK, REQUEST_ACK);
    request.put_fixed(&ifinfomsg(0, 0, 0));
    request.put_str(IFLA_IFNAME, name);
    let replies = match socket.request(request, &format_args!("look up interface {name}")) {
        Err(NetlinkError::Kernel { errno, .. }) if errno == libc::ENODEV => return Ok(None),
        other => other?,
    };
    match replies.first() {
        Some(reply) => decode_link_message(reply).map(Some),
        None => Ok(None),
    }
}

/// `struct ifinfomsg` for one interface (0: by name), with the flags to set under `change`.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; IFINFOMSG_LEN] {
    let mut bytes = [0u8; IFINFOMSG_LEN];
    bytes[0] = libc::AF_UNSPEC as u8;
    bytes[4..8].copy_from_slice(&index.to_ne_bytes());
    bytes[8..12].copy_from_slice(&flags.to_ne_bytes());
    bytes[12..16].copy_from_slice(&change.to_ne_bytes());
    bytes
}

/// `struct ifaddrmsg`.
fn ifaddrmsg(family: u8, prefix_len: u8, flags: u8, scope: u8, index: u32) -> [u8; IFADDRMSG_LEN] {
    let mut bytes = [family, prefix_len, flags, scope, 0, 0, 0, 0];
    bytes[4..8].copy_from_slice(&index.to_ne_bytes());
    bytes
}

/// RTM_NEWADDR or RTM_DELADDR of a host address (/32 or /128). IPv6 addresses skip duplicate
/// address detection: a virtual IP has to answer at once, and no other host claims it.
pub fn address_request(index: u32, add: bool, address: IpAddr) -> MessageBuilder {
    let (message_type, flags) = if add {
        (RTM_NEWADDR, REQUEST | NLM_F_CREATE | NLM_F_EXCL)
    } else {
        (RTM_DELADDR, REQUEST)
    };
    let mut b = MessageBuilder::new(message_type, flags);
    match address {
        IpAddr::V4(a) => {
            b.put_fixed(&ifaddrmsg(libc::AF_INET as u8, 32, 0, RT_SCOPE_UNIVERSE, index));
            b.put_bytes(IFA_LOCAL, &a.octets())
                .put_bytes(IFA_ADDRESS, &a.octets());
        }
        IpAddr::V6(a) => {
            b.put_fixed(&ifaddrmsg(
                libc::AF_INET6 as u8,
                128,
                IFA_F_NODAD,
                RT_SCOPE_UNIVERSE,
                index,
            ));
            b.put_bytes(IFA_LOCAL, &a.octets())
                .put_bytes(IFA_ADDRESS, &a.octets());
        }
    }
    b
}

pub fn decode_link_message(payload: &[u8]) -> Result<LinkInfo, NetlinkError> {
    if payload.len() < IFINFOMSG_LEN {
        return Err(NetlinkError::Protocol(
            "link message shorter than struct ifinfomsg".into(),
        ));
    }
    let index = u32::from_ne_bytes(payload[4..8].try_into().unwrap());
    let flags = u32::from_ne_bytes(payload[8..12].try_into().unwrap());
    let mut kind = None;
    for attr in attributes(&payload[IFINFOMSG_LEN..]) {
        let (k, value) = attr?;
        if k == IFLA_LINKINFO {
            for inner in attributes(value) {
                let (ik, iv) = inner?;
                if ik == IFLA_INFO_KIND {
                    kind = Some(read_str(iv)?);
                }
            }
        }
    }
    Ok(LinkInfo {
        index,
        up: flags & IFF_UP != 0,
        kind,
    })
}

/// One address of an RTM_GETADDR dump as (interface index, address); `None` for link-local
/// scope and unknown families.
pub fn decode_address_message(payload: &[u8]) -> Result<Option<(u32, IpAddr)>, NetlinkError> {
    Ok(decode_address_entry(payload)?
        .filter(|entry| entry.scope != RT_SCOPE_LINK)
        .map(|entry| (entry.index, entry.address)))
}

struct AddressEntry {
    index: u32,
    scope: u8,
    address: IpAddr,
}

/// One address of an RTM_GETADDR dump, of any scope; `None` for unknown families.
fn decode_address_entry(payload: &[u8]) -> Result<Option<AddressEntry>, NetlinkError> {
    if payload.len() < IFADDRMSG_LEN {
        return Err(NetlinkError::Protocol(
            "address message shorter than struct ifaddrmsg".into(),
        ));
    }
    let (family, scope) = (payload[0], payload[3]);
    let index = u32::from_ne_bytes(payload[4..8].try_into().unwrap());
    let (mut local, mut address) = (None, None);
    for attr in attributes(&payload[IFADDRMSG_LEN..]) {
        let (kind, value) = attr?;
        match kind {
            IFA_LOCAL => local = Some(value),
            IFA_ADDRESS => address = Some(value),
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on point-to-point links.
    let Some(bytes) = local.or(address) else {
        return Ok(None);
    };
    let parsed = match i32::from(family) {
        libc::AF_INET if bytes.len() == 4 => {
            IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
        }
        libc::AF_INET6 if bytes.len() == 16 => {
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap()))
        }
        _ => return Ok(None),
    };
    Ok(Some(AddressEntry {
        index,
        scope,
        address: parsed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::NLMSG_HDRLEN;

    fn get_link_request(name: &str) -> MessageBuilder {
        let mut request = MessageBuilder::new(RTM_GETLINK, REQUEST);
        request.put_fixed(&ifinfomsg(0, 0, 0));
        request.put_str(IFLA_IFNAME, name);
        request
    }

    // The tests below talk to this machine's kernel, read-only: any Linux has `lo` and
    // rtnetlink, so they run without privileges, IPVS or a VM.

    #[test]
    fn real_kernel_batch_matches_each_refusal_to_its_request() {
        let mut socket = NetlinkSocket::open(netlink_sys::protocols::NETLINK_ROUTE).unwrap();
        // 300 requests span three chunks; lookups of `lo` succeed (their replies are not acks
        // and must be skipped), lookups of a missing interface fail with ENODEV.
        let builders = (0..300)
            .map(|i| get_link_request(if i % 3 == 1 { "pp-missing0" } else { "lo" }))
            .collect();
        let (results, broken) = socket.batch(builders);
        assert!(broken.is_none());
        let expected: Vec<_> = (0..300)
            .map(|i| if i % 3 == 1 { Err(libc::ENODEV) } else { Ok(()) })
            .collect();
        assert_eq!(results, expected);
    }

    #[test]
    fn real_kernel_request_and_dump_read_the_loopback_interface() {
        let mut socket = NetlinkSocket::open(netlink_sys::protocols::NETLINK_ROUTE).unwrap();
        let lo = get_link(&mut socket, "lo")
            .unwrap()
            .expect("every namespace has lo");
        assert_eq!(lo.kind, None);
        assert_eq!(get_link(&mut socket, "pp-missing0").unwrap(), None);

        let mut request = MessageBuilder::new(RTM_GETADDR, DUMP);
        request.put_fixed(&ifaddrmsg(libc::AF_UNSPEC as u8, 0, 0, 0, 0));
        let replies = socket.dump(request, &"list addresses").unwrap();
        let lo_addresses: Vec<IpAddr> = replies
            .iter()
            .filter_map(|reply| decode_address_message(reply).unwrap())
            .filter(|(index, _)| *index == lo.index)
            .map(|(_, address)| address)
            .collect();
        if lo.up {
            assert!(
                lo_addresses.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
                "{lo_addresses:?}"
            );
        }
    }

    #[test]
    fn real_kernel_generic_netlink_resolves_families_and_reports_missing_ones() {
        let mut socket = NetlinkSocket::open(netlink_sys::protocols::NETLINK_GENERIC).unwrap();
        assert_eq!(crate::ipvs::resolve_family(&mut socket, "nlctrl").unwrap(), 0x10);
        let missing = crate::ipvs::resolve_family(&mut socket, "ppnosuchfamily");
        assert!(
            matches!(&missing, Err(NetlinkError::FamilyNotFound(name)) if name == "ppnosuchfamily"),
            "{missing:?}"
        );
    }

    #[test]
    fn add_ipv4_address_is_byte_exact() {
        let bytes = address_request(7, true, "10.96.0.10".parse().unwrap()).finish(3);
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &40u32.to_ne_bytes()[..], &20u16.to_ne_bytes(), &(0x1u16 | 0x600).to_ne_bytes(),
            &3u32.to_ne_bytes(), &0u32.to_ne_bytes(),
            &[2, 32, 0, 0], &7u32.to_ne_bytes(),
            &8u16.to_ne_bytes(), &2u16.to_ne_bytes(), &[10, 96, 0, 10],
            &8u16.to_ne_bytes(), &1u16.to_ne_bytes(), &[10, 96, 0, 10],
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn delete_ipv6_address_is_a_host_route_without_dad() {
        let bytes = address_request(7, false, "fd00::1".parse().unwrap()).finish(3);
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), RTM_DELADDR);
        assert_eq!(&bytes[NLMSG_HDRLEN..NLMSG_HDRLEN + 4], &[10, 128, IFA_F_NODAD, 0]);
    }

    fn kernel_address_message(family: u8, scope: u8, index: u32, local: &[u8]) -> Vec<u8> {
        let mut b = MessageBuilder::new(RTM_NEWADDR, 2);
        b.put_fixed(&ifaddrmsg(family, 32, 0x80, scope, index));
        b.put_bytes(IFA_ADDRESS, local)
            .put_bytes(IFA_LOCAL, local)
            .put_str(3, "portpolicy-ipvs0");
        b.finish(1)[NLMSG_HDRLEN..].to_vec()
    }

    #[test]
    fn dumped_addresses_are_read_and_link_local_ones_skipped() {
        let v4 = kernel_address_message(2, RT_SCOPE_UNIVERSE, 9, &[10, 96, 0, 1]);
        assert_eq!(
            decode_address_message(&v4).unwrap(),
            Some((9, "10.96.0.1".parse().unwrap()))
        );
        let v6: Ipv6Addr = "fd00::7".parse().unwrap();
        let global = kernel_address_message(10, RT_SCOPE_UNIVERSE, 9, &v6.octets());
        assert_eq!(
            decode_address_message(&global).unwrap(),
            Some((9, IpAddr::V6(v6)))
        );
        let ll: Ipv6Addr = "fe80::1".parse().unwrap();
        let link_local = kernel_address_message(10, RT_SCOPE_LINK, 9, &ll.octets());
        assert_eq!(decode_address_message(&link_local).unwrap(), None);
    }

    #[test]
    fn link_message_reports_index_state_and_kind() {
        let mut b = MessageBuilder::new(RTM_NEWLINK, 0);
        b.put_fixed(&ifinfomsg(12, IFF_UP | 0x40, 0));
        b.put_str(IFLA_IFNAME, "portpolicy-ipvs0");
        b.begin_nest(IFLA_LINKINFO)
            .put_str(IFLA_INFO_KIND, "dummy")
            .end_nest();
        let info = decode_link_message(&b.finish(1)[NLMSG_HDRLEN..]).unwrap();
        assert_eq!(
            info,
            LinkInfo {
                index: 12,
                up: true,
                kind: Some("dummy".into())
            }
        );
    }
}
