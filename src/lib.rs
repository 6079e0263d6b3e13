//! portpolicy's edges: the operator, the node agent and `portpolicy plan`'s reading of files and
//! live clusters.
//!
//! Every decision is made by [`portpolicy_core`]; this crate watches, reads and writes.

pub mod agent;
#[cfg(target_os = "linux")]
pub mod debug;
pub mod flags;
pub mod live;
pub mod operator;
pub mod snapshot_files;
