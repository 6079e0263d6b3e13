//! portpolicy: predictable Kubernetes ports.
//!
//! The core (allocation, conflict detection, IPVS planning and diffing) is pure: no I/O, no
//! clock, no unseeded randomness. The operator, the node agent and `portpolicy plan` are thin
//! edges around it, so all three make the same decisions from the same objects.

pub mod agent;
pub mod crd;
pub mod governance;
pub mod hostport;
pub mod ipvs;
#[cfg(target_os = "linux")]
pub mod netlink;
pub mod nodeport;
pub mod operator;
pub mod plan;
pub mod ports;
pub mod problem;
pub mod selector;
pub mod snapshot;
pub mod table;
