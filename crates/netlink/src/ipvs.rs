//! IPVS over generic netlink (family "IPVS"), laid out as in `include/uapi/linux/ip_vs.h` and
//! parsed the way `net/netfilter/ipvs/ip_vs_ctl.c` does.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::NetlinkError;
use super::message::{MessageBuilder, attributes, read_be16, read_str, read_u16, read_u32, split_generic};
use super::socket::{DUMP, NetlinkSocket, REQUEST, REQUEST_ACK};
use portpolicy_core::ipvs::{
    IpvsOp, IpvsService, IpvsTable, RealServerKey, RealServerState, VirtualServerKey,
};
use portpolicy_core::ports::Protocol;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

pub const IPVS_FAMILY: &str = "IPVS";
const IPVS_GENL_VERSION: u8 = 1;

// enum ipvs_cmd
const CMD_NEW_SERVICE: u8 = 1;
const CMD_SET_SERVICE: u8 = 2;
const CMD_DEL_SERVICE: u8 = 3;
const CMD_GET_SERVICE: u8 = 4;
const CMD_NEW_DEST: u8 = 5;
const CMD_SET_DEST: u8 = 6;
const CMD_DEL_DEST: u8 = 7;
const CMD_GET_DEST: u8 = 8;
const CMD_GET_INFO: u8 = 15;
const CMD_FLUSH: u8 = 17;

// IPVS_CMD_ATTR_*
const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;

// IPVS_SVC_ATTR_*
const SVC_ATTR_AF: u16 = 1;
const SVC_ATTR_PROTOCOL: u16 = 2;
const SVC_ATTR_ADDR: u16 = 3;
const SVC_ATTR_PORT: u16 = 4;
const SVC_ATTR_FWMARK: u16 = 5;
const SVC_ATTR_SCHED_NAME: u16 = 6;
const SVC_ATTR_FLAGS: u16 = 7;
const SVC_ATTR_TIMEOUT: u16 = 8;
const SVC_ATTR_NETMASK: u16 = 9;

// IPVS_DEST_ATTR_*
const DEST_ATTR_ADDR: u16 = 1;
const DEST_ATTR_PORT: u16 = 2;
const DEST_ATTR_FWD_METHOD: u16 = 3;
const DEST_ATTR_WEIGHT: u16 = 4;
const DEST_ATTR_U_THRESH: u16 = 5;
const DEST_ATTR_L_THRESH: u16 = 6;
const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const DEST_ATTR_INACT_CONNS: u16 = 8;
const DEST_ATTR_ADDR_FAMILY: u16 = 11;

// IPVS_INFO_ATTR_*
const INFO_ATTR_VERSION: u16 = 1;
const INFO_ATTR_CONN_TAB_SIZE: u16 = 2;

/// IP_VS_SVC_F_PERSISTENT: ClientIP session affinity.
pub const SVC_F_PERSISTENT: u32 = 0x1;
/// IP_VS_SVC_F_HASHED: set by the kernel on every service it holds; never ours to compare.
pub const SVC_F_HASHED: u32 = 0x2;
/// IP_VS_CONN_F_MASQ: forwarding by NAT.
const FWD_MASQUERADE: u32 = 0;

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

/// Version and connection table size, as `ipvsadm` prints them in its first line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpvsInfo {
    /// Encoded as the kernel does: major << 16 | minor << 8 | patch.
    pub version: u32,
    pub connection_table_size: u32,
}

impl fmt::Display for IpvsInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.version;
        write!(
            f,
            "IP Virtual Server version {}.{}.{} (size={})",
            (v >> 16) & 0xff,
            (v >> 8) & 0xff,
            v & 0xff,
            self.connection_table_size
        )
    }
}

/// What a batch did: how many operations the kernel took, and each refused one with its reason.
/// A refused operation does not stop the ones after it (the kernel carries on through a batch).
/// If the socket itself fails, the operations not yet acknowledged are reported as
/// [`NetlinkError::Io`] with an unknown outcome: dump the table before trusting it again.
#[derive(Debug, Default)]
pub struct ApplyOutcome {
    pub applied: usize,
    pub failed: Vec<(IpvsOp, NetlinkError)>,
}

impl ApplyOutcome {
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}

/// A generic netlink socket bound to the kernel's IPVS family.
pub struct IpvsHandle {
    socket: NetlinkSocket,
    family: u16,
}

impl IpvsHandle {
    /// Opens a socket and resolves the IPVS family id; fails with
    /// [`NetlinkError::FamilyNotFound`] when `ip_vs` is not loaded.
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = NetlinkSocket::open(netlink_sys::protocols::NETLINK_GENERIC)?;
        let family = resolve_family(&mut socket, IPVS_FAMILY)?;
        Ok(IpvsHandle { socket, family })
    }

    /// Every (address, port, protocol) virtual server with its real servers, weights and
    /// connection counters. Firewall-mark services are not portpolicy's and are left out.
    pub fn dump(&mut self) -> Result<IpvsTable, NetlinkError> {
        let request = MessageBuilder::generic(self.family, DUMP, CMD_GET_SERVICE, IPVS_GENL_VERSION);
        let replies = self.socket.dump(request, &"list IPVS services")?;
        let mut table = IpvsTable::new();
        for reply in replies {
            if let Some((key, service)) = decode_service_message(&reply)? {
                table.insert(key, service);
            }
        }
        // The kernel serves one dump at a time per socket, so real servers are listed service by
        // service rather than batched.
        for (key, service) in table.iter_mut() {
            service.real_servers = self.real_servers(key)?;
        }
        Ok(table)
    }

    /// The real servers of one virtual server, as `ipvsadm -Ln -t|-u|--sctp-service` lists
    /// them; none when the virtual server does not exist.
    pub fn real_servers(
        &mut self,
        key: &VirtualServerKey,
    ) -> Result<BTreeMap<RealServerKey, RealServerState>, NetlinkError> {
        let mut request = MessageBuilder::generic(self.family, DUMP, CMD_GET_DEST, IPVS_GENL_VERSION);
        put_service(&mut request, key, None);
        let rule = format_args!("list real servers of {key}");
        let mut reals = BTreeMap::new();
        for reply in self.socket.dump(request, &rule)? {
            if let Some((real, state)) = decode_dest_message(&reply)? {
                reals.insert(real, state);
            }
        }
        Ok(reals)
    }

    /// Applies operations in order, many per `sendmsg`. Each refused operation is reported with
    /// the kernel's errno; the others still happen.
    pub fn apply(&mut self, ops: &[IpvsOp]) -> ApplyOutcome {
        let builders = ops.iter().map(|op| encode_op(self.family, op, REQUEST)).collect();
        let (results, broken) = self.socket.batch(builders);
        let mut outcome = ApplyOutcome::default();
        for (op, result) in ops.iter().zip(&results) {
            match result {
                Ok(()) => outcome.applied += 1,
                Err(errno) => outcome
                    .failed
                    .push((op.clone(), NetlinkError::kernel(op, *errno))),
            }
        }
        if let Some(err) = broken {
            let reason = err.to_string();
            for op in &ops[results.len()..] {
                let unsettled =
                    std::io::Error::other(format!("outcome unknown, the socket failed ({op}): {reason}"));
                outcome.failed.push((op.clone(), NetlinkError::Io(unsettled)));
            }
        }
        outcome
    }

    pub fn info(&mut self) -> Result<IpvsInfo, NetlinkError> {
        let request = MessageBuilder::generic(self.family, REQUEST_ACK, CMD_GET_INFO, IPVS_GENL_VERSION);
        let replies = self.socket.request(request, &"read IPVS info")?;
        let reply = replies
            .first()
            .ok_or_else(|| NetlinkError::Protocol("no reply to GET_INFO".into()))?;
        decode_info_message(reply)
    }

    /// Removes every virtual server. Only ever on an operator's explicit request.
    pub fn flush(&mut self) -> Result<(), NetlinkError> {
        let request = MessageBuilder::generic(self.family, REQUEST_ACK, CMD_FLUSH, IPVS_GENL_VERSION);
        self.socket.request(request, &"flush the IPVS table").map(|_| ())
    }
}

/// Asks the generic netlink controller for a family's id.
pub(super) fn resolve_family(socket: &mut NetlinkSocket, name: &str) -> Result<u16, NetlinkError> {
    let mut request = MessageBuilder::generic(GENL_ID_CTRL, REQUEST_ACK, CTRL_CMD_GETFAMILY, 1);
    request.put_str(CTRL_ATTR_FAMILY_NAME, name);
    let replies = match socket.request(request, &format_args!("resolve generic netlink family {name}")) {
        Err(NetlinkError::Kernel { errno, .. }) if errno == libc::ENOENT => {
            return Err(NetlinkError::FamilyNotFound(name.to_string()));
        }
        other => other?,
    };
    for reply in replies {
        let (_, attrs) = split_generic(&reply)?;
        for attr in attributes(attrs) {
            let (kind, payload) = attr?;
            if kind == CTRL_ATTR_FAMILY_ID {
                return read_u16(payload);
            }
        }
    }
    Err(NetlinkError::FamilyNotFound(name.to_string()))
}

/// The request for one operation. `flags` is the netlink flags (the batch adds the ACK flag).
pub fn encode_op(family: u16, op: &IpvsOp, flags: u16) -> MessageBuilder {
    let generic = |command| MessageBuilder::generic(family, flags, command, IPVS_GENL_VERSION);
    match op {
        IpvsOp::AddService {
            key,
            scheduler,
            persistence_timeout,
        } => {
            let mut b = generic(CMD_NEW_SERVICE);
            put_service(&mut b, key, Some((&**scheduler, *persistence_timeout)));
            b
        }
        IpvsOp::UpdateService {
            key,
            scheduler,
            persistence_timeout,
        } => {
            let mut b = generic(CMD_SET_SERVICE);
            put_service(&mut b, key, Some((&**scheduler, *persistence_timeout)));
            b
        }
        IpvsOp::DeleteService { key } => {
            let mut b = generic(CMD_DEL_SERVICE);
            put_service(&mut b, key, None);
            b
        }
        IpvsOp::AddRealServer {
            service,
            real,
            weight,
        } => {
            let mut b = generic(CMD_NEW_DEST);
            put_service(&mut b, service, None);
            put_dest(&mut b, real, Some(*weight));
            b
        }
        IpvsOp::UpdateRealServer {
            service,
            real,
            weight,
        } => {
            let mut b = generic(CMD_SET_DEST);
            put_service(&mut b, service, None);
            put_dest(&mut b, real, Some(*weight));
            b
        }
        IpvsOp::DeleteRealServer { service, real } => {
            let mut b = generic(CMD_DEL_DEST);
            put_service(&mut b, service, None);
            put_dest(&mut b, real, None);
            b
        }
    }
}

/// `IPVS_CMD_ATTR_SERVICE`: the identity always, the settings when creating or changing it.
fn put_service(b: &mut MessageBuilder, key: &VirtualServerKey, settings: Option<(&str, Option<u32>)>) {
    b.begin_nest(CMD_ATTR_SERVICE);
    b.put_u16(SVC_ATTR_AF, address_family(key.address));
    b.put_u16(SVC_ATTR_PROTOCOL, protocol_number(key.protocol));
    put_address(b, SVC_ATTR_ADDR, key.address);
    b.put_be16(SVC_ATTR_PORT, key.port);
    if let Some((scheduler, persistence_timeout)) = settings {
        b.put_str(SVC_ATTR_SCHED_NAME, scheduler);
        // struct ip_vs_flags { flags; mask }: a full mask makes the request the whole truth.
        let flags = if persistence_timeout.is_some() {
            SVC_F_PERSISTENT
        } else {
            0
        };
        let mut flag_bytes = [0u8; 8];
        flag_bytes[..4].copy_from_slice(&flags.to_ne_bytes());
        flag_bytes[4..].copy_from_slice(&u32::MAX.to_ne_bytes());
        b.put_bytes(SVC_ATTR_FLAGS, &flag_bytes);
        b.put_u32(SVC_ATTR_TIMEOUT, persistence_timeout.unwrap_or(0));
        // The persistence granularity: one client address (/32, or a prefix length for IPv6).
        let netmask = match key.address {
            IpAddr::V4(_) => u32::MAX,
            IpAddr::V6(_) => 128,
        };
        b.put_u32(SVC_ATTR_NETMASK, netmask);
    }
    b.end_nest();
}

/// `IPVS_CMD_ATTR_DEST`: the identity always, masquerading and the weight when given.
fn put_dest(b: &mut MessageBuilder, real: &RealServerKey, weight: Option<u32>) {
    b.begin_nest(CMD_ATTR_DEST);
    put_address(b, DEST_ATTR_ADDR, real.address);
    b.put_be16(DEST_ATTR_PORT, real.port);
    if let Some(weight) = weight {
        b.put_u32(DEST_ATTR_FWD_METHOD, FWD_MASQUERADE);
        b.put_u32(DEST_ATTR_WEIGHT, weight);
        b.put_u32(DEST_ATTR_U_THRESH, 0);
        b.put_u32(DEST_ATTR_L_THRESH, 0);
    }
    b.put_u16(DEST_ATTR_ADDR_FAMILY, address_family(real.address));
    b.end_nest();
}

fn put_address(b: &mut MessageBuilder, kind: u16, address: IpAddr) {
    match address {
        IpAddr::V4(a) => b.put_bytes(kind, &a.octets()),
        IpAddr::V6(a) => b.put_bytes(kind, &a.octets()),
    };
}

fn address_family(address: IpAddr) -> u16 {
    match address {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn protocol_number(protocol: Protocol) -> u16 {
    match protocol {
        Protocol::Tcp => libc::IPPROTO_TCP as u16,
        Protocol::Udp => libc::IPPROTO_UDP as u16,
        Protocol::Sctp => libc::IPPROTO_SCTP as u16,
    }
}

fn protocol_from_number(number: u16) -> Option<Protocol> {
    match i32::from(number) {
        libc::IPPROTO_TCP => Some(Protocol::Tcp),
        libc::IPPROTO_UDP => Some(Protocol::Udp),
        libc::IPPROTO_SCTP => Some(Protocol::Sctp),
        _ => None,
    }
}

/// The kernel sends `union nf_inet_addr` (16 bytes) whatever the family; IPv4 is the first 4.
fn read_address(family: u16, payload: &[u8]) -> Result<IpAddr, NetlinkError> {
    match family {
        AF_INET if payload.len() >= 4 => Ok(IpAddr::V4(Ipv4Addr::new(
            payload[0], payload[1], payload[2], payload[3],
        ))),
        AF_INET6 if payload.len() >= 16 => {
            let octets: [u8; 16] = payload[..16].try_into().unwrap();
            Ok(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => Err(NetlinkError::Protocol(format!(
            "address of {} bytes for address family {family}",
            payload.len()
        ))),
    }
}

/// Finds the one nested attribute of `kind` in a generic netlink message body.
fn nested(message: &[u8], kind: u16) -> Result<Option<&[u8]>, NetlinkError> {
    let (_, attrs) = split_generic(message)?;
    for attr in attributes(attrs) {
        let (k, payload) = attr?;
        if k == kind {
            return Ok(Some(payload));
        }
    }
    Ok(None)
}

/// One message of a GET_SERVICE dump; `None` for services portpolicy does not model
/// (firewall marks, protocols other than TCP/UDP/SCTP).
pub fn decode_service_message(
    message: &[u8],
) -> Result<Option<(VirtualServerKey, IpvsService)>, NetlinkError> {
    let Some(service) = nested(message, CMD_ATTR_SERVICE)? else {
        return Err(NetlinkError::Protocol(
            "service message without IPVS_CMD_ATTR_SERVICE".into(),
        ));
    };
    let (mut family, mut protocol, mut address, mut port, mut fwmark) = (None, None, None, None, 0);
    let (mut scheduler, mut flags, mut timeout) = (String::new(), 0u32, 0u32);
    for attr in attributes(service) {
        let (kind, payload) = attr?;
        match kind {
            SVC_ATTR_AF => family = Some(read_u16(payload)?),
            SVC_ATTR_PROTOCOL => protocol = Some(read_u16(payload)?),
            SVC_ATTR_ADDR => address = Some(payload),
            SVC_ATTR_PORT => port = Some(read_be16(payload)?),
            SVC_ATTR_FWMARK => fwmark = read_u32(payload)?,
            SVC_ATTR_SCHED_NAME => scheduler = read_str(payload)?,
            SVC_ATTR_FLAGS => flags = read_u32(payload)?,
            SVC_ATTR_TIMEOUT => timeout = read_u32(payload)?,
            _ => {}
        }
    }
    if fwmark != 0 {
        return Ok(None);
    }
    let (Some(family), Some(protocol), Some(address), Some(port)) = (family, protocol, address, port) else {
        return Err(NetlinkError::Protocol(
            "service without address family, protocol, address or port".into(),
        ));
    };
    let Some(protocol) = protocol_from_number(protocol) else {
        return Ok(None);
    };
    let key = VirtualServerKey {
        address: read_address(family, address)?,
        port,
        protocol,
    };
    let service = IpvsService {
        scheduler: scheduler.into(),
        persistence_timeout: (flags & SVC_F_PERSISTENT != 0).then_some(timeout),
        real_servers: BTreeMap::new(),
    };
    Ok(Some((key, service)))
}

/// One message of a GET_DEST dump. Forwarding methods other than masquerading are not
/// portpolicy's and are left out, so they are never mistaken for its own real servers.
pub fn decode_dest_message(message: &[u8]) -> Result<Option<(RealServerKey, RealServerState)>, NetlinkError> {
    let Some(dest) = nested(message, CMD_ATTR_DEST)? else {
        return Err(NetlinkError::Protocol(
            "destination message without IPVS_CMD_ATTR_DEST".into(),
        ));
    };
    let (mut family, mut address, mut port, mut forwarding) = (None, None, None, FWD_MASQUERADE);
    let mut state = RealServerState::default();
    for attr in attributes(dest) {
        let (kind, payload) = attr?;
        match kind {
            DEST_ATTR_ADDR_FAMILY => family = Some(read_u16(payload)?),
            DEST_ATTR_ADDR => address = Some(payload),
            DEST_ATTR_PORT => port = Some(read_be16(payload)?),
            DEST_ATTR_FWD_METHOD => forwarding = read_u32(payload)?,
            DEST_ATTR_WEIGHT => state.weight = read_u32(payload)?,
            DEST_ATTR_ACTIVE_CONNS => state.active_connections = read_u32(payload)?,
            DEST_ATTR_INACT_CONNS => state.inactive_connections = read_u32(payload)?,
            _ => {}
        }
    }
    if forwarding != FWD_MASQUERADE {
        return Ok(None);
    }
    let (Some(address), Some(port)) = (address, port) else {
        return Err(NetlinkError::Protocol(
            "destination without address or port".into(),
        ));
    };
    // Kernels before 3.18 send no family: then the 16 bytes are IPv4 iff the tail is zero.
    let family = family.unwrap_or(if address.len() >= 16 && address[4..16].iter().all(|b| *b == 0) {
        AF_INET
    } else {
        AF_INET6
    });
    let real = RealServerKey {
        address: read_address(family, address)?,
        port,
    };
    Ok(Some((real, state)))
}

pub fn decode_info_message(message: &[u8]) -> Result<IpvsInfo, NetlinkError> {
    let (_, attrs) = split_generic(message)?;
    let (mut version, mut size) = (None, None);
    for attr in attributes(attrs) {
        let (kind, payload) = attr?;
        match kind {
            INFO_ATTR_VERSION => version = Some(read_u32(payload)?),
            INFO_ATTR_CONN_TAB_SIZE => size = Some(read_u32(payload)?),
            _ => {}
        }
    }
    match (version, size) {
        (Some(version), Some(connection_table_size)) => Ok(IpvsInfo {
            version,
            connection_table_size,
        }),
        _ => Err(NetlinkError::Protocol(
            "GET_INFO reply without version or table size".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{NLM_F_ACK, NLM_F_REQUEST, NLMSG_HDRLEN};

    fn tcp(address: &str, port: u16) -> VirtualServerKey {
        VirtualServerKey {
            address: address.parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    fn nest(kind: u16, children: &[Vec<u8>]) -> Vec<u8> {
        nla(kind | 0x8000, &children.concat())
    }

    /// A whole message assembled by hand from the uapi layout, independently of MessageBuilder.
    fn genl_message(family: u16, flags: u16, sequence: u32, command: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let body = attrs.concat();
        let mut out = ((NLMSG_HDRLEN + 4 + body.len()) as u32).to_ne_bytes().to_vec();
        out.extend_from_slice(&family.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&sequence.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&[command, 1, 0, 0]);
        out.extend(body);
        out
    }

    #[test]
    fn add_persistent_ipv4_service_is_byte_exact() {
        let op = IpvsOp::AddService {
            key: tcp("10.96.0.10", 80),
            scheduler: "rr".into(),
            persistence_timeout: Some(10800),
        };
        let bytes = encode_op(0x22, &op, NLM_F_REQUEST | NLM_F_ACK).finish(9);
        let mut flags = 1u32.to_ne_bytes().to_vec();
        flags.extend_from_slice(&u32::MAX.to_ne_bytes());
        let expected = genl_message(
            0x22,
            NLM_F_REQUEST | NLM_F_ACK,
            9,
            1,
            &[nest(
                1,
                &[
                    nla(1, &2u16.to_ne_bytes()),
                    nla(2, &6u16.to_ne_bytes()),
                    nla(3, &[10, 96, 0, 10]),
                    nla(4, &[0, 80]),
                    nla(6, b"rr\0"),
                    nla(7, &flags),
                    nla(8, &10800u32.to_ne_bytes()),
                    nla(9, &[0xff; 4]),
                ],
            )],
        );
        assert_eq!(bytes, expected);
    }

    #[test]
    fn add_ipv6_udp_real_server_is_byte_exact() {
        let service = VirtualServerKey {
            address: "fd00::10".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        };
        let real = RealServerKey {
            address: "fd00:1::2".parse().unwrap(),
            port: 5353,
        };
        let op = IpvsOp::AddRealServer {
            service,
            real,
            weight: 3,
        };
        let bytes = encode_op(0x22, &op, NLM_F_REQUEST).finish(1);
        let vip: Ipv6Addr = "fd00::10".parse().unwrap();
        let rip: Ipv6Addr = "fd00:1::2".parse().unwrap();
        let expected = genl_message(
            0x22,
            NLM_F_REQUEST,
            1,
            5,
            &[
                nest(
                    1,
                    &[
                        nla(1, &10u16.to_ne_bytes()),
                        nla(2, &17u16.to_ne_bytes()),
                        nla(3, &vip.octets()),
                        nla(4, &53u16.to_be_bytes()),
                    ],
                ),
                nest(
                    2,
                    &[
                        nla(1, &rip.octets()),
                        nla(2, &5353u16.to_be_bytes()),
                        nla(3, &0u32.to_ne_bytes()),
                        nla(4, &3u32.to_ne_bytes()),
                        nla(5, &0u32.to_ne_bytes()),
                        nla(6, &0u32.to_ne_bytes()),
                        nla(11, &10u16.to_ne_bytes()),
                    ],
                ),
            ],
        );
        assert_eq!(bytes, expected);
    }

    #[test]
    fn delete_real_server_sends_identities_only() {
        let op = IpvsOp::DeleteRealServer {
            service: tcp("10.0.0.1", 443),
            real: RealServerKey {
                address: "10.1.0.5".parse().unwrap(),
                port: 8443,
            },
        };
        let bytes = encode_op(0x22, &op, NLM_F_REQUEST).finish(1);
        let (command, attrs) = split_generic(&bytes[NLMSG_HDRLEN..]).unwrap();
        assert_eq!(command, CMD_DEL_DEST);
        let dest = nested(&bytes[NLMSG_HDRLEN..], CMD_ATTR_DEST).unwrap().unwrap();
        let kinds: Vec<u16> = attributes(dest).map(|a| a.unwrap().0).collect();
        assert_eq!(kinds, vec![DEST_ATTR_ADDR, DEST_ATTR_PORT, DEST_ATTR_ADDR_FAMILY]);
        assert_eq!(attributes(attrs).count(), 2);
    }

    /// A GET_SERVICE dump message as the kernel sends it: 16-byte address, hashed flag set,
    /// statistics nested in.
    fn kernel_service_message(
        address: [u8; 16],
        family: u16,
        port: u16,
        flags: u32,
        timeout: u32,
    ) -> Vec<u8> {
        let mut flag_bytes = flags.to_ne_bytes().to_vec();
        flag_bytes.extend_from_slice(&u32::MAX.to_ne_bytes());
        genl_message(
            0x22,
            2,
            5,
            CMD_NEW_SERVICE,
            &[nest(
                1,
                &[
                    nla(1, &family.to_ne_bytes()),
                    nla(2, &6u16.to_ne_bytes()),
                    nla(3, &address),
                    nla(4, &port.to_be_bytes()),
                    nla(6, b"wrr\0"),
                    nla(11, b"\0"),
                    nla(7, &flag_bytes),
                    nla(8, &timeout.to_ne_bytes()),
                    nla(9, &u32::MAX.to_ne_bytes()),
                    nest(10, &[nla(1, &7u32.to_ne_bytes())]),
                ],
            )],
        )[NLMSG_HDRLEN..]
            .to_vec()
    }

    #[test]
    fn dumped_service_masks_the_hashed_flag_and_reads_persistence() {
        let mut address = [0u8; 16];
        address[..4].copy_from_slice(&[10, 96, 0, 1]);
        let message = kernel_service_message(address, 2, 443, SVC_F_HASHED | SVC_F_PERSISTENT, 600);
        let (key, service) = decode_service_message(&message).unwrap().unwrap();
        assert_eq!(key, tcp("10.96.0.1", 443));
        assert_eq!(&*service.scheduler, "wrr");
        assert_eq!(service.persistence_timeout, Some(600));

        let plain = kernel_service_message(address, 2, 443, SVC_F_HASHED, 0);
        let (_, service) = decode_service_message(&plain).unwrap().unwrap();
        assert_eq!(service.persistence_timeout, None);
    }

    #[test]
    fn dumped_ipv6_service_uses_all_sixteen_bytes() {
        let address: Ipv6Addr = "fd00::a".parse().unwrap();
        let message = kernel_service_message(address.octets(), 10, 80, SVC_F_HASHED, 0);
        let (key, _) = decode_service_message(&message).unwrap().unwrap();
        assert_eq!(key, tcp("fd00::a", 80));
    }

    #[test]
    fn dumped_fwmark_service_is_left_out() {
        let message = genl_message(
            0x22,
            2,
            5,
            CMD_NEW_SERVICE,
            &[nest(
                1,
                &[
                    nla(1, &2u16.to_ne_bytes()),
                    nla(5, &7u32.to_ne_bytes()),
                    nla(6, b"rr\0"),
                ],
            )],
        );
        assert_eq!(decode_service_message(&message[NLMSG_HDRLEN..]).unwrap(), None);
    }

    fn kernel_dest_message(forwarding: u32) -> Vec<u8> {
        let mut address = [0u8; 16];
        address[..4].copy_from_slice(&[10, 0, 1, 2]);
        genl_message(
            0x22,
            2,
            6,
            CMD_NEW_DEST,
            &[nest(
                2,
                &[
                    nla(1, &address),
                    nla(2, &8080u16.to_be_bytes()),
                    nla(3, &forwarding.to_ne_bytes()),
                    nla(4, &5u32.to_ne_bytes()),
                    nla(5, &0u32.to_ne_bytes()),
                    nla(6, &0u32.to_ne_bytes()),
                    nla(7, &3u32.to_ne_bytes()),
                    nla(8, &11u32.to_ne_bytes()),
                    nla(9, &0u32.to_ne_bytes()),
                    nest(10, &[nla(1, &1u32.to_ne_bytes())]),
                    nla(11, &2u16.to_ne_bytes()),
                ],
            )],
        )[NLMSG_HDRLEN..]
            .to_vec()
    }

    #[test]
    fn dumped_dest_carries_weight_and_connection_counters() {
        let (real, state) = decode_dest_message(&kernel_dest_message(FWD_MASQUERADE))
            .unwrap()
            .unwrap();
        assert_eq!(real.address, "10.0.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(real.port, 8080);
        assert_eq!(
            state,
            RealServerState {
                weight: 5,
                active_connections: 3,
                inactive_connections: 11
            }
        );
        // IP_VS_CONN_F_DROUTE = 3: someone else's direct-routing real server.
        assert_eq!(decode_dest_message(&kernel_dest_message(3)).unwrap(), None);
    }

    #[test]
    fn info_reply_prints_like_ipvsadm() {
        let message = genl_message(
            0x22,
            0,
            1,
            CMD_GET_INFO,
            &[nla(1, &0x010201u32.to_ne_bytes()), nla(2, &4096u32.to_ne_bytes())],
        );
        let info = decode_info_message(&message[NLMSG_HDRLEN..]).unwrap();
        assert_eq!(info.to_string(), "IP Virtual Server version 1.2.1 (size=4096)");
    }
}
