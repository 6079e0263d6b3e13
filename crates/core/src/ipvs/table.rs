//! The kernel's IPVS table as data: what a dump returns and what a plan wants.
//!
//! Forwarding is always masquerading (NAT), as kube-proxy programs it, so it is not a field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::ports::Protocol;

/// A virtual server's identity: address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct VirtualServerKey {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for VirtualServerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            IpAddr::V4(a) => write!(f, "{} {a}:{}", self.protocol, self.port),
            IpAddr::V6(a) => write!(f, "{} [{a}]:{}", self.protocol, self.port),
        }
    }
}

/// A real server's identity within its virtual server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct RealServerKey {
    pub address: IpAddr,
    pub port: u16,
}

impl fmt::Display for RealServerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.address {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RealServerState {
    pub weight: u32,
    /// Connection counters as the kernel reports them; zero in a desired table.
    pub active_connections: u32,
    pub inactive_connections: u32,
}

impl RealServerState {
    pub fn with_weight(weight: u32) -> Self {
        RealServerState {
            weight,
            ..Default::default()
        }
    }

    pub(crate) fn has_connections(&self) -> bool {
        self.active_connections > 0 || self.inactive_connections > 0
    }
}

/// A virtual server's settings and its real servers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IpvsService {
    /// Shared: a cluster has a handful of scheduler names and many thousands of services.
    pub scheduler: Arc<str>,
    /// Seconds of ClientIP persistence; `None` when the service is not persistent.
    pub persistence_timeout: Option<u32>,
    pub real_servers: BTreeMap<RealServerKey, RealServerState>,
}

impl IpvsService {
    /// Whether the settings the kernel stores per service (not the real servers) are equal.
    pub(crate) fn same_settings(&self, other: &IpvsService) -> bool {
        self.scheduler == other.scheduler && self.persistence_timeout == other.persistence_timeout
    }
}

/// A whole IPVS table, ordered so that every walk over it is deterministic.
pub type IpvsTable = BTreeMap<VirtualServerKey, IpvsService>;

/// One change to the kernel's table: what one netlink request does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum IpvsOp {
    AddService {
        key: VirtualServerKey,
        scheduler: Arc<str>,
        persistence_timeout: Option<u32>,
    },
    UpdateService {
        key: VirtualServerKey,
        scheduler: Arc<str>,
        persistence_timeout: Option<u32>,
    },
    DeleteService {
        key: VirtualServerKey,
    },
    AddRealServer {
        service: VirtualServerKey,
        real: RealServerKey,
        weight: u32,
    },
    UpdateRealServer {
        service: VirtualServerKey,
        real: RealServerKey,
        weight: u32,
    },
    DeleteRealServer {
        service: VirtualServerKey,
        real: RealServerKey,
    },
}

impl IpvsOp {
    /// A short label for metrics: `add_service`, `delete_real_server`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            IpvsOp::AddService { .. } => "add_service",
            IpvsOp::UpdateService { .. } => "update_service",
            IpvsOp::DeleteService { .. } => "delete_service",
            IpvsOp::AddRealServer { .. } => "add_real_server",
            IpvsOp::UpdateRealServer { .. } => "update_real_server",
            IpvsOp::DeleteRealServer { .. } => "delete_real_server",
        }
    }

    /// The virtual server the operation touches.
    pub fn service(&self) -> &VirtualServerKey {
        match self {
            IpvsOp::AddService { key, .. }
            | IpvsOp::UpdateService { key, .. }
            | IpvsOp::DeleteService { key } => key,
            IpvsOp::AddRealServer { service, .. }
            | IpvsOp::UpdateRealServer { service, .. }
            | IpvsOp::DeleteRealServer { service, .. } => service,
        }
    }

    /// Applies the operation to a table the way the kernel would, or says why the kernel would
    /// refuse it (the errno it would return). This is the model the diff is tested against.
    pub fn apply_to(&self, table: &mut IpvsTable) -> Result<(), ApplyRefusal> {
        match self {
            IpvsOp::AddService {
                key,
                scheduler,
                persistence_timeout,
            } => {
                if table.contains_key(key) {
                    return Err(ApplyRefusal::Exists);
                }
                table.insert(
                    *key,
                    IpvsService {
                        scheduler: scheduler.clone(),
                        persistence_timeout: *persistence_timeout,
                        real_servers: BTreeMap::new(),
                    },
                );
            }
            IpvsOp::UpdateService {
                key,
                scheduler,
                persistence_timeout,
            } => {
                let svc = table.get_mut(key).ok_or(ApplyRefusal::NotFound)?;
                svc.scheduler = scheduler.clone();
                svc.persistence_timeout = *persistence_timeout;
            }
            IpvsOp::DeleteService { key } => {
                table.remove(key).ok_or(ApplyRefusal::NotFound)?;
            }
            IpvsOp::AddRealServer {
                service,
                real,
                weight,
            } => {
                let svc = table.get_mut(service).ok_or(ApplyRefusal::NotFound)?;
                if svc.real_servers.contains_key(real) {
                    return Err(ApplyRefusal::Exists);
                }
                svc.real_servers
                    .insert(*real, RealServerState::with_weight(*weight));
            }
            IpvsOp::UpdateRealServer {
                service,
                real,
                weight,
            } => {
                let svc = table.get_mut(service).ok_or(ApplyRefusal::NotFound)?;
                let state = svc.real_servers.get_mut(real).ok_or(ApplyRefusal::NotFound)?;
                state.weight = *weight;
            }
            IpvsOp::DeleteRealServer { service, real } => {
                let svc = table.get_mut(service).ok_or(ApplyRefusal::NotFound)?;
                svc.real_servers.remove(real).ok_or(ApplyRefusal::NotFound)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for IpvsOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IpvsOp::AddService { key, scheduler, .. } => write!(f, "add service {key} ({scheduler})"),
            IpvsOp::UpdateService { key, scheduler, .. } => write!(f, "update service {key} ({scheduler})"),
            IpvsOp::DeleteService { key } => write!(f, "delete service {key}"),
            IpvsOp::AddRealServer {
                service,
                real,
                weight,
            } => {
                write!(f, "add real server {real} weight {weight} to {service}")
            }
            IpvsOp::UpdateRealServer {
                service,
                real,
                weight,
            } => {
                write!(f, "set real server {real} weight {weight} in {service}")
            }
            IpvsOp::DeleteRealServer { service, real } => {
                write!(f, "delete real server {real} from {service}")
            }
        }
    }
}

/// Keys written as text, for tests: a literal that does not parse is a bug in the test.
#[cfg(any(test, feature = "test-util"))]
pub mod test_keys {
    use super::*;

    pub fn vs_key(address: &str, port: u16, protocol: Protocol) -> VirtualServerKey {
        VirtualServerKey {
            address: address.parse().expect("test address"),
            port,
            protocol,
        }
    }

    pub fn rs_key(address: &str, port: u16) -> RealServerKey {
        RealServerKey {
            address: address.parse().expect("test address"),
            port,
        }
    }
}

/// Why the kernel would refuse an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyRefusal {
    /// EEXIST
    Exists,
    /// ENOENT (or ESRCH for services)
    NotFound,
}
