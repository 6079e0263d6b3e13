//! The kernel edge: IPVS over generic netlink and the dummy interface over rtnetlink.
//!
//! Messages are built and parsed by a small typed module ([`message`]) rather than a netlink
//! crate: portpolicy needs a dozen attributes, and owning the bytes keeps batching (many
//! requests per `sendmsg`, see [`socket`]) simple. Nothing here decides what the table should
//! be; the planner does that and hands over [`portpolicy_core::ipvs::IpvsOp`]s.
//!
//! The only crate of portpolicy with `unsafe` code (one `setsockopt`). Talking to the kernel is
//! Linux-only; the error type is not, so the agent's dataplane and its in-memory test double
//! report kernel refusals as the same typed [`NetlinkError`] everywhere.

#[cfg(target_os = "linux")]
pub mod conntrack;
#[cfg(target_os = "linux")]
pub mod ipvs;
#[cfg(target_os = "linux")]
pub mod link;
#[cfg(target_os = "linux")]
pub mod message;
#[cfg(target_os = "linux")]
pub mod socket;

#[cfg(target_os = "linux")]
pub use conntrack::ConntrackHandle;
#[cfg(target_os = "linux")]
pub use ipvs::{ApplyOutcome, IpvsHandle, IpvsInfo};
#[cfg(target_os = "linux")]
pub use link::DummyLink;

/// The errnos the kernel's IPVS refuses requests with, for code that must speak like it (the
/// agent's in-memory dataplane).
pub mod errno {
    pub use libc::{EEXIST, EIO, ENOENT};
}

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
            name: errno_name(errno),
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

/// Every name [`errno_name`] gives, so a metric labelled by it can list them all up front.
pub const ERRNO_NAMES: [&str; 21] = [
    "EPERM",
    "ENOENT",
    "ESRCH",
    "EINTR",
    "EIO",
    "EAGAIN",
    "ENOMEM",
    "EACCES",
    "EBUSY",
    "EEXIST",
    "ENODEV",
    "EINVAL",
    "ENOSPC",
    "ERANGE",
    "EOPNOTSUPP",
    "EAFNOSUPPORT",
    "EADDRNOTAVAIL",
    "ENOBUFS",
    "EPROTONOSUPPORT",
    "EMSGSIZE",
    "EUNKNOWN",
];

/// The symbolic name of the errnos netlink requests return, for messages and for matching.
pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENOBUFS => "ENOBUFS",
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT",
        libc::EMSGSIZE => "EMSGSIZE",
        _ => "EUNKNOWN",
    }
}
