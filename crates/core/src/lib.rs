//! portpolicy's core: the PortPolicy types, nodePort allocation, hostPort conflict detection,
//! and each node's IPVS plan and diff.
//!
//! Pure by construction: this crate has no Kubernetes client, no async runtime, no netlink and
//! no file system access, and the compiler holds it to that (its dependencies do not offer
//! them). It reads snapshot files only through readers its callers open for it. No clock and no unseeded randomness either: callers pass the time in. The operator,
//! the node agent and `portpolicy plan` are thin edges around it, so all three make the same
//! decisions from the same objects.
#![forbid(unsafe_code)]

pub mod cidr;
pub mod crd;
pub mod governance;
pub mod hash;
pub mod hostport;
pub mod intent;
pub mod ipvs;
pub mod nodeport;
pub mod plan;
pub mod ports;
pub mod problem;
pub mod selector;
pub mod service;
pub mod snapshot;
pub mod table;
pub mod well_known;
