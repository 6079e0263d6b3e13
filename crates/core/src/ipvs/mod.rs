//! IPVS: the kernel's table model (shared by the planner, the diff and the netlink edge).

pub mod diff;
pub mod plan;
pub mod table;

pub use table::{IpvsOp, IpvsService, IpvsTable, RealServerKey, RealServerState, VirtualServerKey};
