//! Port numbers, protocols and ranges as Kubernetes spells them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A Kubernetes port protocol. An empty or missing protocol means TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// Parses the protocol field of a Kubernetes port, defaulting to TCP like the API server does.
    pub fn from_k8s(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("") | Some("TCP") => Ok(Protocol::Tcp),
            Some("UDP") => Ok(Protocol::Udp),
            Some("SCTP") => Ok(Protocol::Sctp),
            Some(other) => Err(format!(
                "unsupported protocol {other:?}: must be TCP, UDP or SCTP"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inclusive range of port numbers, written `low-high` or a single `port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    /// The API server's default `--service-node-port-range`.
    pub const DEFAULT_NODE_PORTS: PortRange = PortRange {
        low: 30000,
        high: 32767,
    };

    pub fn new(low: u16, high: u16) -> Result<Self, String> {
        if low == 0 {
            return Err("ports start at 1".to_string());
        }
        if low > high {
            return Err(format!("low end {low} is above high end {high}"));
        }
        Ok(PortRange { low, high })
    }

    pub fn single(port: u16) -> Result<Self, String> {
        Self::new(port, port)
    }

    pub fn contains(&self, port: u16) -> bool {
        self.low <= port && port <= self.high
    }

    /// Number of ports in the range (at most 65535, so never zero).
    pub fn len(&self) -> usize {
        usize::from(self.high - self.low) + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.low <= other.high && other.low <= self.high
    }

    pub(crate) fn contains_range(&self, other: &PortRange) -> bool {
        self.low <= other.low && other.high <= self.high
    }

    pub fn iter(&self) -> impl Iterator<Item = u16> + use<> {
        self.low..=self.high
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let parse = |part: &str| -> Result<u16, String> {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "{text:?} is not a port range: expected \"PORT\" or \"LOW-HIGH\" with ports 1-65535"
                ));
            }
            part.parse::<u16>()
                .map_err(|_| format!("{part:?} in {text:?} is not a port: must be 1-65535"))
        };
        match text.split_once('-') {
            Some((low, high)) => PortRange::new(parse(low)?, parse(high)?)
                .map_err(|e| format!("{text:?} is not a valid port range: {e}")),
            None => PortRange::single(parse(text)?).map_err(|e| format!("{text:?} is not a valid port: {e}")),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

/// Converts an API port number (`i32` in k8s-openapi) to a port, naming what is wrong otherwise.
pub(crate) fn port_from_i32(value: i32) -> Result<u16, String> {
    u16::try_from(value)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{value} is not a port: must be 1-65535"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_and_single_ports() {
        let cases: &[(&str, Option<(u16, u16)>)] = &[
            ("30000-32767", Some((30000, 32767))),
            (" 31000 - 31099 ", Some((31000, 31099))),
            ("8080", Some((8080, 8080))),
            ("65535", Some((65535, 65535))),
            ("0-10", None),
            ("10-5", None),
            ("65536", None),
            ("-5", None),
            ("a-b", None),
            ("", None),
            ("1-2-3", None),
        ];
        for (text, want) in cases {
            let got = text.parse::<PortRange>().ok().map(|r| (r.low, r.high));
            assert_eq!(&got, want, "parsing {text:?}");
        }
    }

    #[test]
    fn range_arithmetic() {
        let r: PortRange = "31000-31099".parse().unwrap();
        assert_eq!(r.len(), 100);
        assert!(r.contains(31000) && r.contains(31099) && !r.contains(31100));
        assert!(r.overlaps(&"31099-32000".parse().unwrap()));
        assert!(!r.overlaps(&"31100-32000".parse().unwrap()));
        assert!(PortRange::DEFAULT_NODE_PORTS.contains_range(&r));
        assert_eq!(r.to_string(), "31000-31099");
        assert_eq!(PortRange::single(80).unwrap().to_string(), "80");
    }

    #[test]
    fn protocol_defaults_to_tcp_and_rejects_unknown() {
        assert_eq!(Protocol::from_k8s(None), Ok(Protocol::Tcp));
        assert_eq!(Protocol::from_k8s(Some("")), Ok(Protocol::Tcp));
        assert_eq!(Protocol::from_k8s(Some("SCTP")), Ok(Protocol::Sctp));
        assert!(Protocol::from_k8s(Some("tcp")).is_err());
        assert!(port_from_i32(0).is_err());
        assert!(port_from_i32(70000).is_err());
        assert_eq!(port_from_i32(443), Ok(443));
    }
}
