//! `portpolicy agent`: makes this node's kernel IPVS match the node's plan, changing only what
//! differs.

pub mod dataplane;
pub mod health_check;
pub mod metrics;
pub mod nft;
pub mod sync;
pub mod sysctl;
