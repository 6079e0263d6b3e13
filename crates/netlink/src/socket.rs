//! A blocking netlink socket that sends single requests, dumps, and batches of requests.
//!
//! Batches are the reason this exists: kube-proxy pays one round trip per IPVS change, which
//! is what makes its 10k-service syncs slow. Here up to [`BATCH_MESSAGES`] requests travel in one
//! `sendmsg`. Only the last request of a chunk asks for an acknowledgement; the kernel answers
//! every failed request anyway, in order, so once the last acknowledgement arrives every error of
//! the chunk has arrived before it and is matched back to its request by sequence number.

use std::io;

use netlink_sys::{Socket, SocketAddr};

use super::NetlinkError;
use super::message::{
    Ack, MessageBuilder, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP,
    NLMSG_OVERRUN, parse_ack, split_messages,
};

/// Requests per `sendmsg`. Bounded so that even if every request of a chunk fails, the error
/// messages (about 1 KiB of receive buffer each) fit the default socket receive buffer.
pub const BATCH_MESSAGES: usize = 128;

const RECEIVE_BUFFER: usize = 4 << 20;
const DATAGRAM_CAPACITY: usize = 64 << 10;

pub struct NetlinkSocket {
    socket: Socket,
    next_sequence: u32,
    datagram: Vec<u8>,
}

/// What one reply means to the exchange it answers.
enum Reply {
    Data,
    Ignore,
    End,
}

/// How one request of a batch went: `Ok` or the kernel's errno.
pub type RequestResult = Result<(), i32>;

impl NetlinkSocket {
    /// Opens a socket for a netlink protocol (`NETLINK_GENERIC`, `NETLINK_ROUTE`) talking to the kernel.
    pub fn open(protocol: isize) -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Failed requests are answered with their header only, not the whole request.
        socket.set_cap_ack(true)?;
        grow_receive_buffer(&socket);
        Ok(NetlinkSocket {
            socket,
            next_sequence: 1,
            datagram: Vec::with_capacity(DATAGRAM_CAPACITY),
        })
    }

    fn sequence(&mut self) -> u32 {
        let sequence = self.next_sequence;
        self.next_sequence = self.next_sequence.wrapping_add(1).max(1);
        sequence
    }

    /// Sends one request that asks for an acknowledgement and returns the payloads of any
    /// replies that came before it (a `GETFAMILY` or `GETLINK` answer). A refusal becomes
    /// [`NetlinkError::Kernel`] naming `rule`.
    pub fn request(
        &mut self,
        builder: MessageBuilder,
        rule: &dyn std::fmt::Display,
    ) -> Result<Vec<Vec<u8>>, NetlinkError> {
        let mut replies = Vec::new();
        self.exchange(
            builder,
            |kind, payload| match kind {
                NLMSG_ERROR => match parse_ack(payload)?.errno {
                    0 => Ok(Reply::End),
                    errno => Err(NetlinkError::kernel(rule, errno)),
                },
                NLMSG_NOOP | NLMSG_DONE => Ok(Reply::Ignore),
                _ => Ok(Reply::Data),
            },
            |payload| {
                replies.push(payload.to_vec());
                Ok(())
            },
        )?;
        Ok(replies)
    }

    /// Sends a dump request and collects every message payload until `NLMSG_DONE`.
    pub fn dump(
        &mut self,
        builder: MessageBuilder,
        rule: &dyn std::fmt::Display,
    ) -> Result<Vec<Vec<u8>>, NetlinkError> {
        let mut replies = Vec::new();
        self.dump_each(builder, rule, |payload| {
            replies.push(payload.to_vec());
            Ok(())
        })?;
        Ok(replies)
    }

    /// Like [`dump`](Self::dump), but hands each message payload to `visit` as it arrives
    /// instead of keeping them all: a connection-tracking table can hold a million entries.
    pub fn dump_each(
        &mut self,
        builder: MessageBuilder,
        rule: &dyn std::fmt::Display,
        visit: impl FnMut(&[u8]) -> Result<(), NetlinkError>,
    ) -> Result<(), NetlinkError> {
        let classify = |kind, payload: &[u8]| match kind {
            // A dump that fails part-way says so in the int that NLMSG_DONE carries.
            NLMSG_DONE => match payload
                .get(..4)
                .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
            {
                Some(error) if error < 0 => Err(NetlinkError::kernel(rule, -error)),
                _ => Ok(Reply::End),
            },
            NLMSG_ERROR => match parse_ack(payload)?.errno {
                0 => Ok(Reply::Ignore),
                errno => Err(NetlinkError::kernel(rule, errno)),
            },
            NLMSG_NOOP => Ok(Reply::Ignore),
            NLMSG_OVERRUN => Err(NetlinkError::Protocol("dump overrun".into())),
            _ => Ok(Reply::Data),
        };
        self.exchange(builder, classify, visit)
    }

    /// Sends one request and hands the payloads of its data replies to `sink` until `classify`
    /// says the exchange is over or fails. Replies to other sequence numbers (late answers to an
    /// earlier request) are skipped.
    fn exchange(
        &mut self,
        builder: MessageBuilder,
        classify: impl Fn(u16, &[u8]) -> Result<Reply, NetlinkError>,
        mut sink: impl FnMut(&[u8]) -> Result<(), NetlinkError>,
    ) -> Result<(), NetlinkError> {
        let sequence = self.sequence();
        self.socket.send(&builder.finish(sequence), 0)?;
        loop {
            for (kind, payload, reply_sequence) in self.receive()? {
                if reply_sequence != sequence {
                    continue;
                }
                match classify(kind, &payload)? {
                    Reply::Data => sink(&payload)?,
                    Reply::Ignore => {}
                    Reply::End => return Ok(()),
                }
            }
        }
    }

    /// Sends requests in chunks of [`BATCH_MESSAGES`] and returns one result per request, in order.
    /// The builders must not set `NLM_F_ACK`; this sets it on the last request of each chunk.
    /// An I/O error stops the batch: results are returned for the requests already settled, and
    /// the error for the rest.
    pub fn batch(&mut self, builders: Vec<MessageBuilder>) -> (Vec<RequestResult>, Option<NetlinkError>) {
        let mut results = Vec::with_capacity(builders.len());
        let mut builders = builders.into_iter().peekable();
        while builders.peek().is_some() {
            let chunk: Vec<MessageBuilder> = builders.by_ref().take(BATCH_MESSAGES).collect();
            let last = chunk.len() - 1;
            let mut wire = Vec::with_capacity(chunk.len() * 96);
            let mut sequences = Vec::with_capacity(chunk.len());
            for (i, mut builder) in chunk.into_iter().enumerate() {
                if i == last {
                    builder.add_flags(NLM_F_ACK);
                }
                let sequence = self.sequence();
                sequences.push(sequence);
                wire.extend(builder.finish(sequence));
            }
            match self.settle_chunk(&wire, &sequences) {
                Ok(chunk_results) => results.extend(chunk_results),
                Err(err) => return (results, Some(err)),
            }
        }
        (results, None)
    }

    fn settle_chunk(&mut self, wire: &[u8], sequences: &[u32]) -> Result<Vec<RequestResult>, NetlinkError> {
        self.socket.send(wire, 0)?;
        let last_sequence = *sequences.last().expect("chunks are never empty");
        let mut errors: Vec<Ack> = Vec::new();
        loop {
            for (kind, payload, _) in self.receive()? {
                if kind != NLMSG_ERROR {
                    continue;
                }
                let ack = parse_ack(&payload)?;
                if ack.request.sequence == last_sequence {
                    errors.push(ack);
                    return Ok(match_acks(sequences, &errors));
                }
                errors.push(ack);
            }
        }
    }

    /// Reads one datagram and returns (type, payload, sequence) of each message in it.
    fn receive(&mut self) -> Result<Vec<(u16, Vec<u8>, u32)>, NetlinkError> {
        self.datagram.clear();
        let len = loop {
            match self.socket.recv(&mut self.datagram, libc::MSG_TRUNC) {
                Ok(len) => break len,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err.into()),
            }
        };
        if len > self.datagram.len() {
            return Err(NetlinkError::Protocol(format!(
                "datagram of {len} bytes exceeds the {} byte buffer",
                self.datagram.len()
            )));
        }
        let messages = split_messages(&self.datagram)?;
        Ok(messages
            .into_iter()
            .map(|m| (m.header.message_type, m.payload.to_vec(), m.header.sequence))
            .collect())
    }
}

/// Matches the error messages of a chunk to its requests: a request without an error message
/// succeeded (the kernel answers every failure, and the chunk's last request always).
pub fn match_acks(sequences: &[u32], acks: &[Ack]) -> Vec<RequestResult> {
    sequences
        .iter()
        .map(
            |sequence| match acks.iter().find(|ack| ack.request.sequence == *sequence) {
                Some(ack) if ack.errno != 0 => Err(ack.errno),
                _ => Ok(()),
            },
        )
        .collect()
}

/// A larger buffer keeps big dumps and error bursts from overrunning; as root the kernel's cap
/// can be lifted with `SO_RCVBUFFORCE`, otherwise the capped `SO_RCVBUF` has to do.
#[allow(unsafe_code)] // the one unsafe call in portpolicy: netlink-sys has no SO_RCVBUFFORCE
fn grow_receive_buffer(socket: &Socket) {
    use std::os::fd::AsRawFd;
    let size = RECEIVE_BUFFER as libc::c_int;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a valid pointer to a c_int.
    let forced = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if forced != 0 {
        let _ = socket.set_rx_buf_sz(size);
    }
}

/// Flags every request of a family carries; dumps add `NLM_F_DUMP`.
pub const REQUEST: u16 = NLM_F_REQUEST;
pub const REQUEST_ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;
pub const DUMP: u16 = NLM_F_REQUEST | NLM_F_DUMP;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Header;

    fn ack(sequence: u32, errno: i32) -> Ack {
        Ack {
            errno,
            request: Header {
                length: 36,
                message_type: 0x1d,
                flags: 1,
                sequence,
                port: 0,
            },
        }
    }

    #[test]
    fn requests_without_an_error_message_succeeded() {
        let results = match_acks(&[10, 11, 12, 13], &[ack(11, libc::EEXIST), ack(13, 0)]);
        assert_eq!(results, vec![Ok(()), Err(libc::EEXIST), Ok(()), Ok(())]);
    }

    #[test]
    fn a_failing_last_request_is_reported_by_its_own_ack() {
        let results = match_acks(&[5, 6], &[ack(6, libc::ENOENT)]);
        assert_eq!(results, vec![Ok(()), Err(libc::ENOENT)]);
    }

    #[test]
    fn acks_for_other_sequences_are_ignored() {
        let results = match_acks(&[20, 21], &[ack(3, libc::EINVAL), ack(21, 0)]);
        assert_eq!(results, vec![Ok(()), Ok(())]);
    }
}
