//! The kernel edge: IPVS over generic netlink and the dummy interface over rtnetlink.
//!
//! Messages are built and parsed by a small typed module ([`message`]) rather than a netlink
//! crate: portpolicy needs a dozen attributes, and owning the bytes keeps batching (many
//! requests per `sendmsg`, see [`socket`]) simple. Nothing here decides what the table should
//! be; the planner does that and hands over [`portpolicy_core::ipvs::IpvsOp`]s.
//!
//! The only crate of portpolicy with `unsafe` code (one `setsockopt`), and Linux-only.
#![cfg(target_os = "linux")]

pub mod conntrack;
pub mod ipvs;
pub mod link;
pub mod message;
pub mod socket;

pub use conntrack::ConntrackHandle;
pub use ipvs::{ApplyOutcome, IpvsHandle, IpvsInfo};
pub use link::DummyLink;

/// What can go wrong talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("generic netlink family {0:?} not found (is its kernel module loaded?)")]
    FamilyNotFound(String),
    #[error("kernel refused to {rule}: {name} (errno {errno})")]
    Kernel {
        /// The refused request, spelled for people (`add service TCP 10.96.0.10:80 (rr)`).
        rule: String,
        errno: i32,
        name: &'static str,
    },
    #[error("unexpected netlink reply: {0}")]
    Protocol(String),
    /// A request portpolicy refuses to send (an impossible interface name, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl NetlinkError {
    pub fn kernel(rule: &dyn std::fmt::Display, errno: i32) -> Self {
        NetlinkError::Kernel {
            rule: rule.to_string(),
            errno,
            name: message::errno_name(errno),
        }
    }

    /// The kernel's errno, when the kernel refused a request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            NetlinkError::Io(err) => err.raw_os_error(),
            _ => None,
        }
    }
}
