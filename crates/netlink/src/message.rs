//! Netlink wire format: message headers, generic netlink headers and attributes.
//!
//! Only what portpolicy sends and reads is here, laid out as in the kernel's uapi headers
//! (`linux/netlink.h`, `linux/genetlink.h`). Everything is native-endian except where a
//! family says otherwise (IPVS ports are big-endian and written with [`MessageBuilder::put_be16`]).

use super::NetlinkError;

pub const NLMSG_HDRLEN: usize = 16;
pub const NLA_HDRLEN: usize = 4;
pub const GENL_HDRLEN: usize = 4;

pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_DUMP: u16 = 0x300;

pub const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | 0x4000);

/// Rounds up to netlink's 4-byte alignment.
pub const fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// Builds one netlink message in place: header first, then the family's fixed header, then
/// attributes. Lengths are patched when a nest or the message is finished, so callers never count.
#[derive(Debug)]
pub struct MessageBuilder {
    buf: Vec<u8>,
    open_nests: Vec<usize>,
}

impl MessageBuilder {
    pub fn new(message_type: u16, flags: u16) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        buf.extend_from_slice(&message_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // sequence, patched in finish()
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: 0 lets the kernel fill it in
        MessageBuilder {
            buf,
            open_nests: Vec::new(),
        }
    }

    pub fn add_flags(&mut self, flags: u16) -> &mut Self {
        let current = u16::from_ne_bytes([self.buf[6], self.buf[7]]);
        self.buf[6..8].copy_from_slice(&(current | flags).to_ne_bytes());
        self
    }

    /// A generic netlink request: netlink header plus `struct genlmsghdr`.
    pub fn generic(family: u16, flags: u16, command: u8, version: u8) -> Self {
        let mut builder = MessageBuilder::new(family, flags);
        builder.buf.extend_from_slice(&[command, version, 0, 0]);
        builder
    }

    /// Appends a family's fixed header (`ifinfomsg`, `ifaddrmsg`, ...), padded to alignment.
    pub fn put_fixed(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.pad();
        self
    }

    pub fn put_bytes(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = (NLA_HDRLEN + payload.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.pad();
        self
    }

    pub fn put_u16(&mut self, kind: u16, value: u16) -> &mut Self {
        self.put_bytes(kind, &value.to_ne_bytes())
    }

    pub fn put_be16(&mut self, kind: u16, value: u16) -> &mut Self {
        self.put_bytes(kind, &value.to_be_bytes())
    }

    pub fn put_u32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.put_bytes(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string, as the kernel's `NLA_NUL_STRING` policy wants.
    pub fn put_str(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut payload = Vec::with_capacity(value.len() + 1);
        payload.extend_from_slice(value.as_bytes());
        payload.push(0);
        self.put_bytes(kind, &payload)
    }

    /// Opens a nested attribute; every `begin_nest` needs an `end_nest`.
    pub fn begin_nest(&mut self, kind: u16) -> &mut Self {
        self.open_nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end_nest(&mut self) -> &mut Self {
        let start = self.open_nests.pop().expect("end_nest without begin_nest");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// Stamps the sequence number and the total length, and returns the wire bytes.
    pub fn finish(mut self, sequence: u32) -> Vec<u8> {
        assert!(self.open_nests.is_empty(), "unclosed nested attribute");
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&sequence.to_ne_bytes());
        self.buf
    }

    fn pad(&mut self) {
        let padded = align(self.buf.len());
        self.buf.resize(padded, 0);
    }
}

/// `struct nlmsghdr` as read from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub length: u32,
    pub message_type: u16,
    pub flags: u16,
    pub sequence: u32,
    pub port: u32,
}

impl Header {
    fn parse(bytes: &[u8]) -> Header {
        Header {
            length: u32::from_ne_bytes(bytes[0..4].try_into().unwrap()),
            message_type: u16::from_ne_bytes(bytes[4..6].try_into().unwrap()),
            flags: u16::from_ne_bytes(bytes[6..8].try_into().unwrap()),
            sequence: u32::from_ne_bytes(bytes[8..12].try_into().unwrap()),
            port: u32::from_ne_bytes(bytes[12..16].try_into().unwrap()),
        }
    }
}

/// One message of a received datagram: its header and the bytes after the header.
#[derive(Clone, Copy, Debug)]
pub struct Message<'a> {
    pub header: Header,
    pub payload: &'a [u8],
}

/// Splits a datagram into its messages; a length that runs past the datagram is a protocol error.
pub fn split_messages(mut datagram: &[u8]) -> Result<Vec<Message<'_>>, NetlinkError> {
    let mut messages = Vec::new();
    while datagram.len() >= NLMSG_HDRLEN {
        let header = Header::parse(datagram);
        let len = header.length as usize;
        if len < NLMSG_HDRLEN || len > datagram.len() {
            return Err(NetlinkError::Protocol(format!(
                "message length {len} does not fit the {} bytes received",
                datagram.len()
            )));
        }
        messages.push(Message {
            header,
            payload: &datagram[NLMSG_HDRLEN..len],
        });
        datagram = &datagram[align(len).min(datagram.len())..];
    }
    Ok(messages)
}

/// What an `NLMSG_ERROR` message says: `errno` 0 is a positive acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Positive errno (the kernel sends it negated); 0 means success.
    pub errno: i32,
    /// The header of the request being answered, echoed by the kernel.
    pub request: Header,
}

/// Parses the payload of an `NLMSG_ERROR` message (`struct nlmsgerr`).
pub fn parse_ack(payload: &[u8]) -> Result<Ack, NetlinkError> {
    if payload.len() < 4 + NLMSG_HDRLEN {
        return Err(NetlinkError::Protocol(format!(
            "error message of {} bytes is shorter than struct nlmsgerr",
            payload.len()
        )));
    }
    let error = i32::from_ne_bytes(payload[0..4].try_into().unwrap());
    Ok(Ack {
        errno: error.checked_neg().unwrap_or(i32::MAX),
        request: Header::parse(&payload[4..]),
    })
}

/// A generic netlink message body split into its command and attributes.
pub fn split_generic(payload: &[u8]) -> Result<(u8, &[u8]), NetlinkError> {
    if payload.len() < GENL_HDRLEN {
        return Err(NetlinkError::Protocol(
            "generic netlink message without its header".into(),
        ));
    }
    Ok((payload[0], &payload[GENL_HDRLEN..]))
}

/// Iterates over the attributes of a message body or of a nested attribute.
#[derive(Clone, Debug)]
pub struct Attributes<'a> {
    rest: &'a [u8],
}

pub fn attributes(bytes: &[u8]) -> Attributes<'_> {
    Attributes { rest: bytes }
}

impl<'a> Iterator for Attributes<'a> {
    /// (type without the nested/byte-order flags, payload)
    type Item = Result<(u16, &'a [u8]), NetlinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.len() < NLA_HDRLEN {
            return None;
        }
        let len = u16::from_ne_bytes([self.rest[0], self.rest[1]]) as usize;
        let kind = u16::from_ne_bytes([self.rest[2], self.rest[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > self.rest.len() {
            let err = NetlinkError::Protocol(format!(
                "attribute {kind} claims {len} bytes, {} remain",
                self.rest.len()
            ));
            self.rest = &[];
            return Some(Err(err));
        }
        let payload = &self.rest[NLA_HDRLEN..len];
        self.rest = &self.rest[align(len).min(self.rest.len())..];
        Some(Ok((kind, payload)))
    }
}

pub fn read_u16(payload: &[u8]) -> Result<u16, NetlinkError> {
    fixed::<2>(payload).map(u16::from_ne_bytes)
}

pub fn read_be16(payload: &[u8]) -> Result<u16, NetlinkError> {
    fixed::<2>(payload).map(u16::from_be_bytes)
}

pub fn read_u32(payload: &[u8]) -> Result<u32, NetlinkError> {
    fixed::<4>(payload).map(u32::from_ne_bytes)
}

/// A string attribute, with or without its terminating NUL.
pub fn read_str(payload: &[u8]) -> Result<String, NetlinkError> {
    let end = payload.iter().position(|&b| b == 0).unwrap_or(payload.len());
    String::from_utf8(payload[..end].to_vec())
        .map_err(|_| NetlinkError::Protocol("string attribute is not UTF-8".into()))
}

fn fixed<const N: usize>(payload: &[u8]) -> Result<[u8; N], NetlinkError> {
    payload
        .get(..N)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| NetlinkError::Protocol(format!("attribute of {} bytes, expected {N}", payload.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_lays_out_header_attributes_and_nests_like_the_kernel() {
        let mut b = MessageBuilder::generic(0x1d, NLM_F_REQUEST | NLM_F_ACK, 1, 1);
        b.begin_nest(1).put_u16(1, 2).put_str(6, "rr").end_nest();
        let bytes = b.finish(7);
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &40u32.to_ne_bytes()[..], &0x1du16.to_ne_bytes(), &5u16.to_ne_bytes(),
            &7u32.to_ne_bytes(), &0u32.to_ne_bytes(),
            &[1, 1, 0, 0],
            &20u16.to_ne_bytes(), &(1u16 | 0x8000).to_ne_bytes(),
            &6u16.to_ne_bytes(), &1u16.to_ne_bytes(), &2u16.to_ne_bytes(), &[0, 0],
            &7u16.to_ne_bytes(), &6u16.to_ne_bytes(), b"rr\0", &[0],
        ]
        .concat();
        assert_eq!(bytes, expected);
    }

    #[test]
    fn attributes_round_trip_and_strip_the_nested_flag() {
        let mut b = MessageBuilder::new(20, 0);
        b.put_be16(4, 80).begin_nest(2).put_u32(5, 9).end_nest();
        let bytes = b.finish(1);
        let attrs: Vec<_> = attributes(&bytes[NLMSG_HDRLEN..])
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(attrs.len(), 2);
        assert_eq!((attrs[0].0, read_be16(attrs[0].1).unwrap()), (4, 80));
        assert_eq!(attrs[0].1, &[0, 80]);
        assert_eq!(attrs[1].0, 2);
        let inner: Vec<_> = attributes(attrs[1].1).collect::<Result<_, _>>().unwrap();
        assert_eq!((inner[0].0, read_u32(inner[0].1).unwrap()), (5, 9));
    }

    #[test]
    fn truncated_attribute_is_a_protocol_error() {
        let bytes = [12u8, 0, 1, 0, 0, 0];
        let result: Result<Vec<_>, _> = attributes(&bytes).collect();
        assert!(matches!(result, Err(NetlinkError::Protocol(_))));
    }

    #[test]
    fn split_messages_walks_a_datagram_and_rejects_overlong_lengths() {
        let mut datagram = MessageBuilder::new(NLMSG_DONE, NLM_F_MULTI).finish(3);
        let mut second = MessageBuilder::new(NLMSG_NOOP, 0);
        second.put_u32(1, 42);
        datagram.extend(second.finish(4));
        let messages = split_messages(&datagram).unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].header.sequence, 3);
        assert_eq!(messages[1].header.message_type, NLMSG_NOOP);
        assert_eq!(messages[1].payload.len(), 8);

        datagram[0] = 200;
        assert!(matches!(
            split_messages(&datagram),
            Err(NetlinkError::Protocol(_))
        ));
    }

    #[test]
    fn error_ack_carries_positive_errno_and_the_echoed_request() {
        let request = MessageBuilder::generic(0x1d, NLM_F_REQUEST | NLM_F_ACK, 1, 1).finish(42);
        let mut payload = (-libc::EEXIST).to_ne_bytes().to_vec();
        payload.extend_from_slice(&request);
        let ack = parse_ack(&payload).unwrap();
        assert_eq!(ack.errno, libc::EEXIST);
        assert_eq!(ack.request.sequence, 42);
        assert_eq!(crate::errno_name(ack.errno), "EEXIST");
        assert!(parse_ack(&payload[..10]).is_err());
    }
}
