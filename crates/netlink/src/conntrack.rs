//! Deleting connection-tracking entries over ctnetlink (`NETLINK_NETFILTER`), as kube-proxy does
//! for UDP flows whose real server went away (`conntrack -D`, without running `conntrack`).
//!
//! The kernel deletes an entry by its original tuple, which names the client's address and port,
//! unknown here. So the table is dumped, entries are matched by their original destination (the
//! virtual server) and reply source (the real server), and each match is deleted by its tuple
//! and id (an id that no longer matches means the entry was replaced meanwhile: it is left
//! alone). Layouts from `linux/netfilter/nfnetlink.h` and `nfnetlink_conntrack.h`.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use portpolicy_core::ipvs::StaleFlows;
use portpolicy_core::ports::Protocol;

use super::NetlinkError;
use super::message::{MessageBuilder, attributes, read_be16};
use super::socket::{DUMP, NetlinkSocket, REQUEST};

const NETLINK_NETFILTER: isize = 12;
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const NFNETLINK_V0: u8 = 0;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;

const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;

const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;

const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// One direction of a tracked flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub protocol: u8,
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// A tracked flow as the dump reports it, with what deleting it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub original: Tuple,
    pub reply: Tuple,
    pub id: Option<u32>,
    pub zone: Option<u16>,
}

/// Which flows to delete: by original destination, and optionally by reply source.
#[derive(Clone, Debug, Default)]
pub struct FlowFilter {
    /// (protocol, original destination) matching any reply source.
    any_reply: HashSet<(u8, SocketAddr)>,
    /// (protocol, original destination, reply source).
    with_reply: HashSet<(u8, SocketAddr, SocketAddr)>,
}

impl FlowFilter {
    pub fn new<'a>(stale: impl IntoIterator<Item = &'a StaleFlows>) -> Self {
        let mut filter = FlowFilter::default();
        for flows in stale {
            let protocol = protocol_number(flows.service.protocol);
            let destination = SocketAddr::new(flows.service.address, flows.service.port);
            match flows.real {
                None => {
                    filter.any_reply.insert((protocol, destination));
                }
                Some(real) => {
                    let source = SocketAddr::new(real.address, real.port);
                    filter.with_reply.insert((protocol, destination, source));
                }
            }
        }
        filter
    }

    pub fn is_empty(&self) -> bool {
        self.any_reply.is_empty() && self.with_reply.is_empty()
    }

    pub fn matches(&self, flow: &Flow) -> bool {
        let protocol = flow.original.protocol;
        let destination = flow.original.destination;
        self.any_reply.contains(&(protocol, destination))
            || self
                .with_reply
                .contains(&(protocol, destination, flow.reply.source))
    }
}

pub struct ConntrackHandle {
    socket: NetlinkSocket,
}

impl ConntrackHandle {
    pub fn open() -> Result<Self, NetlinkError> {
        Ok(ConntrackHandle {
            socket: NetlinkSocket::open(NETLINK_NETFILTER)?,
        })
    }

    /// Every tracked flow of both address families that `keep` selects.
    pub fn flows(&mut self, mut keep: impl FnMut(&Flow) -> bool) -> Result<Vec<Flow>, NetlinkError> {
        let mut builder = MessageBuilder::new(message_type(IPCTNL_MSG_CT_GET), DUMP);
        // AF_UNSPEC: every layer-3 family in one dump.
        builder.put_fixed(&nfgenmsg(libc::AF_UNSPEC as u8));
        let mut kept = Vec::new();
        self.socket.dump_each(builder, &"dump conntrack", |payload| {
            if let Some(flow) = decode_flow(payload)?
                && keep(&flow)
            {
                kept.push(flow);
            }
            Ok(())
        })?;
        Ok(kept)
    }

    /// Deletes the flows the filter matches; returns how many were deleted. An entry that went
    /// away (or was replaced) between the dump and the delete is not an error.
    pub fn delete_matching(&mut self, filter: &FlowFilter) -> Result<usize, NetlinkError> {
        if filter.is_empty() {
            return Ok(0);
        }
        let flows = self.flows(|flow| filter.matches(flow))?;
        let requests: Vec<MessageBuilder> = flows.iter().map(encode_delete).collect();
        let (results, io_error) = self.socket.batch(requests);
        if let Some(err) = io_error {
            return Err(err);
        }
        let mut deleted = 0;
        for (flow, result) in flows.iter().zip(results) {
            match result {
                Ok(()) => deleted += 1,
                Err(libc::ENOENT) => {}
                Err(errno) => {
                    let rule = format!("delete conntrack entry {flow:?}");
                    return Err(NetlinkError::kernel(&rule, errno));
                }
            }
        }
        Ok(deleted)
    }
}

fn message_type(message: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | message
}

fn nfgenmsg(family: u8) -> [u8; 4] {
    // family, version, resource id (big-endian, 0)
    [family, NFNETLINK_V0, 0, 0]
}

fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
        Protocol::Sctp => libc::IPPROTO_SCTP as u8,
    }
}

/// A delete request for one flow: its original tuple, its id and zone when the dump gave them.
pub fn encode_delete(flow: &Flow) -> MessageBuilder {
    let family = if flow.original.source.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let mut builder = MessageBuilder::new(message_type(IPCTNL_MSG_CT_DELETE), REQUEST);
    builder.put_fixed(&nfgenmsg(family as u8));
    put_tuple(&mut builder, CTA_TUPLE_ORIG, &flow.original);
    if let Some(id) = flow.id {
        builder.put_bytes(CTA_ID, &id.to_be_bytes());
    }
    if let Some(zone) = flow.zone {
        builder.put_be16(CTA_ZONE, zone);
    }
    builder
}

fn put_tuple(builder: &mut MessageBuilder, kind: u16, tuple: &Tuple) {
    builder.begin_nest(kind).begin_nest(CTA_TUPLE_IP);
    match (tuple.source.ip(), tuple.destination.ip()) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            builder.put_bytes(CTA_IP_V4_SRC, &source.octets());
            builder.put_bytes(CTA_IP_V4_DST, &destination.octets());
        }
        (source, destination) => {
            builder.put_bytes(CTA_IP_V6_SRC, &v6_octets(source));
            builder.put_bytes(CTA_IP_V6_DST, &v6_octets(destination));
        }
    }
    builder.end_nest().begin_nest(CTA_TUPLE_PROTO);
    builder.put_bytes(CTA_PROTO_NUM, &[tuple.protocol]);
    builder.put_be16(CTA_PROTO_SRC_PORT, tuple.source.port());
    builder.put_be16(CTA_PROTO_DST_PORT, tuple.destination.port());
    builder.end_nest().end_nest();
}

fn v6_octets(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

/// One dumped entry (the payload after the netlink header: `nfgenmsg`, then attributes).
/// `None` for entries of protocols without ports (ICMP and the like), which nothing here
/// deletes.
pub fn decode_flow(payload: &[u8]) -> Result<Option<Flow>, NetlinkError> {
    let Some(attrs) = payload.get(4..) else {
        return Err(NetlinkError::Protocol(
            "conntrack message without its header".into(),
        ));
    };
    let (mut original, mut reply, mut id, mut zone) = (None, None, None, None);
    for attr in attributes(attrs) {
        let (kind, value) = attr?;
        match kind {
            CTA_TUPLE_ORIG => original = decode_tuple(value)?,
            CTA_TUPLE_REPLY => reply = decode_tuple(value)?,
            CTA_ID => id = Some(read_be32(value)?),
            CTA_ZONE => zone = Some(read_be16(value)?),
            _ => {}
        }
    }
    Ok(match (original, reply) {
        (Some(original), Some(reply)) => Some(Flow {
            original,
            reply,
            id,
            zone,
        }),
        _ => None,
    })
}

fn decode_tuple(nested: &[u8]) -> Result<Option<Tuple>, NetlinkError> {
    let (mut source, mut destination) = (None, None);
    let (mut protocol, mut source_port, mut destination_port) = (None, None, None);
    for attr in attributes(nested) {
        let (kind, value) = attr?;
        match kind {
            CTA_TUPLE_IP => {
                for attr in attributes(value) {
                    let (kind, value) = attr?;
                    match kind {
                        CTA_IP_V4_SRC => source = Some(IpAddr::V4(read_v4(value)?)),
                        CTA_IP_V4_DST => destination = Some(IpAddr::V4(read_v4(value)?)),
                        CTA_IP_V6_SRC => source = Some(IpAddr::V6(read_v6(value)?)),
                        CTA_IP_V6_DST => destination = Some(IpAddr::V6(read_v6(value)?)),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for attr in attributes(value) {
                    let (kind, value) = attr?;
                    match kind {
                        CTA_PROTO_NUM => protocol = value.first().copied(),
                        CTA_PROTO_SRC_PORT => source_port = Some(read_be16(value)?),
                        CTA_PROTO_DST_PORT => destination_port = Some(read_be16(value)?),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(
        match (protocol, source, destination, source_port, destination_port) {
            (Some(protocol), Some(source), Some(destination), Some(sp), Some(dp)) => Some(Tuple {
                protocol,
                source: SocketAddr::new(source, sp),
                destination: SocketAddr::new(destination, dp),
            }),
            _ => None,
        },
    )
}

fn read_v4(value: &[u8]) -> Result<Ipv4Addr, NetlinkError> {
    <[u8; 4]>::try_from(value)
        .map(Ipv4Addr::from)
        .map_err(|_| NetlinkError::Protocol(format!("IPv4 address of {} bytes", value.len())))
}

fn read_v6(value: &[u8]) -> Result<Ipv6Addr, NetlinkError> {
    <[u8; 16]>::try_from(value)
        .map(Ipv6Addr::from)
        .map_err(|_| NetlinkError::Protocol(format!("IPv6 address of {} bytes", value.len())))
}

fn read_be32(value: &[u8]) -> Result<u32, NetlinkError> {
    <[u8; 4]>::try_from(value.get(..4).unwrap_or_default())
        .map(u32::from_be_bytes)
        .map_err(|_| NetlinkError::Protocol(format!("32-bit attribute of {} bytes", value.len())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{NLMSG_HDRLEN, split_messages};
    use portpolicy_core::ipvs::table::test_keys::{rs_key, vs_key};

    fn socket(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn udp(source: &str, destination: &str) -> Tuple {
        Tuple {
            protocol: 17,
            source: socket(source),
            destination: socket(destination),
        }
    }

    /// A dump entry laid out as the kernel sends one (ctnetlink_fill_info), built with the same
    /// builder the delete uses, so a round trip checks both directions.
    fn kernel_entry(flow: &Flow) -> Vec<u8> {
        let mut builder = MessageBuilder::new(message_type(0), 0x2);
        builder.put_fixed(&nfgenmsg(libc::AF_INET as u8));
        put_tuple(&mut builder, CTA_TUPLE_ORIG, &flow.original);
        put_tuple(&mut builder, CTA_TUPLE_REPLY, &flow.reply);
        builder.put_bytes(3, &0x18eu32.to_be_bytes()); // CTA_STATUS, unread
        if let Some(id) = flow.id {
            builder.put_bytes(CTA_ID, &id.to_be_bytes());
        }
        builder.finish(9)
    }

    #[test]
    fn a_dumped_entry_decodes_to_its_tuples_and_id() {
        let flow = Flow {
            original: udp("10.0.9.9:40000", "10.96.0.53:53"),
            reply: udp("10.0.1.2:5353", "10.0.9.9:40000"),
            id: Some(0xdead_beef),
            zone: None,
        };
        let wire = kernel_entry(&flow);
        let messages = split_messages(&wire).unwrap();
        assert_eq!(decode_flow(messages[0].payload).unwrap(), Some(flow));
    }

    #[test]
    fn a_delete_names_the_original_tuple_id_and_zone_byte_for_byte() {
        let flow = Flow {
            original: udp("10.0.9.9:40000", "10.96.0.53:53"),
            reply: udp("10.0.1.2:5353", "10.0.9.9:40000"),
            id: Some(7),
            zone: Some(3),
        };
        let bytes = encode_delete(&flow).finish(1);
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &88u32.to_ne_bytes()[..], &0x0102u16.to_ne_bytes(), &1u16.to_ne_bytes(),
            &1u32.to_ne_bytes(), &0u32.to_ne_bytes(),
            &[libc::AF_INET as u8, 0, 0, 0],
            // CTA_TUPLE_ORIG { CTA_TUPLE_IP { src, dst }, CTA_TUPLE_PROTO { 17, 40000, 53 } }
            &52u16.to_ne_bytes(), &(1u16 | 0x8000).to_ne_bytes(),
            &20u16.to_ne_bytes(), &(1u16 | 0x8000).to_ne_bytes(),
            &8u16.to_ne_bytes(), &1u16.to_ne_bytes(), &[10, 0, 9, 9],
            &8u16.to_ne_bytes(), &2u16.to_ne_bytes(), &[10, 96, 0, 53],
            &28u16.to_ne_bytes(), &(2u16 | 0x8000).to_ne_bytes(),
            &5u16.to_ne_bytes(), &1u16.to_ne_bytes(), &[17, 0, 0, 0],
            &6u16.to_ne_bytes(), &2u16.to_ne_bytes(), &40000u16.to_be_bytes(), &[0, 0],
            &6u16.to_ne_bytes(), &3u16.to_ne_bytes(), &53u16.to_be_bytes(), &[0, 0],
            &8u16.to_ne_bytes(), &12u16.to_ne_bytes(), &7u32.to_be_bytes(),
            &6u16.to_ne_bytes(), &18u16.to_ne_bytes(), &3u16.to_be_bytes(), &[0, 0],
        ]
        .concat();
        assert_eq!(bytes, expected);
        assert_eq!(bytes.len(), NLMSG_HDRLEN + 72);
    }

    #[test]
    fn ipv6_tuples_round_trip() {
        let flow = Flow {
            original: udp("[fd00:9::9]:40000", "[fd00:96::53]:53"),
            reply: udp("[fd00:1::2]:5353", "[fd00:9::9]:40000"),
            id: None,
            zone: None,
        };
        let wire = kernel_entry(&flow);
        let messages = split_messages(&wire).unwrap();
        assert_eq!(decode_flow(messages[0].payload).unwrap(), Some(flow));
    }

    #[test]
    fn the_filter_matches_by_virtual_server_and_reply_source() {
        let dns = vs_key("10.96.0.53", 53, Protocol::Udp);
        let emptied = vs_key("10.96.0.54", 53, Protocol::Udp);
        let filter = FlowFilter::new(&[
            StaleFlows {
                service: dns,
                real: Some(rs_key("10.0.1.2", 5353)),
            },
            StaleFlows {
                service: emptied,
                real: None,
            },
        ]);
        let flow = |destination: &str, reply_source: &str| Flow {
            original: udp("10.0.9.9:40000", destination),
            reply: udp(reply_source, "10.0.9.9:40000"),
            id: None,
            zone: None,
        };
        assert!(filter.matches(&flow("10.96.0.53:53", "10.0.1.2:5353")));
        assert!(
            !filter.matches(&flow("10.96.0.53:53", "10.0.2.2:5353")),
            "another real server"
        );
        assert!(
            !filter.matches(&flow("10.96.0.53:54", "10.0.1.2:5353")),
            "another port"
        );
        assert!(filter.matches(&flow("10.96.0.54:53", "10.0.7.7:1")));
        let mut tcp = flow("10.96.0.53:53", "10.0.1.2:5353");
        tcp.original.protocol = 6;
        assert!(!filter.matches(&tcp), "TCP flows are never matched");
        assert!(FlowFilter::new(&[]).is_empty());
    }
}
