//! Address ranges (`10.244.0.0/16`), as flags and Service fields spell them.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// An address range: a network address and a prefix length. Parsing clears the host bits
/// (`10.0.0.7/24` is `10.0.0.0/24`), as Go's `net.ParseCIDR` does for the network it returns,
/// so two spellings of one range compare equal and nftables accepts every element.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    address: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The range of `address` with its first `prefix` bits; `None` when the prefix is longer
    /// than the address.
    pub fn new(address: IpAddr, prefix: u8) -> Option<Self> {
        let bits = max_prefix(&address);
        if prefix > bits {
            return None;
        }
        let address = match address {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask32(prefix)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask128(prefix)).into()),
        };
        Some(Cidr { address, prefix })
    }

    /// The network address (host bits zero).
    pub fn address(&self) -> IpAddr {
        self.address
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn is_ipv4(&self) -> bool {
        self.address.is_ipv4()
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => u32::from(*ip) & mask32(self.prefix) == u32::from(net),
            (IpAddr::V6(net), IpAddr::V6(ip)) => u128::from(*ip) & mask128(self.prefix) == u128::from(net),
            _ => false,
        }
    }
}

fn max_prefix(address: &IpAddr) -> u8 {
    if address.is_ipv4() { 32 } else { 128 }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (addr, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR (expected address/prefix)"))?;
        let address: IpAddr = addr.parse().map_err(|e| format!("{text:?}: bad address: {e}"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|e| format!("{text:?}: bad prefix length: {e}"))?;
        Cidr::new(address, prefix)
            .ok_or_else(|| format!("{text:?}: prefix length above {}", max_prefix(&address)))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_reject_nonsense() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().to_string(), "10.0.0.0/8");
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("::/129".parse::<Cidr>().is_err());
        assert!("10.0.0.0/-1".parse::<Cidr>().is_err());
    }

    #[test]
    fn host_bits_are_cleared_so_spellings_of_one_range_are_equal() {
        let sloppy: Cidr = "10.1.2.3/16".parse().unwrap();
        assert_eq!(sloppy.to_string(), "10.1.0.0/16");
        assert_eq!(sloppy, "10.1.0.0/16".parse().unwrap());
        assert_eq!(
            "fd00::1:2/112".parse::<Cidr>().unwrap().to_string(),
            "fd00::1:0/112"
        );
        assert_eq!(
            "192.0.2.9/32".parse::<Cidr>().unwrap().to_string(),
            "192.0.2.9/32"
        );
        assert_eq!("192.0.2.9/0".parse::<Cidr>().unwrap().to_string(), "0.0.0.0/0");
    }

    #[test]
    fn contains_only_addresses_of_its_family_inside_it() {
        let net: Cidr = "192.168.0.0/23".parse().unwrap();
        assert!(net.contains(&ip("192.168.1.255")));
        assert!(!net.contains(&ip("192.168.2.0")));
        assert!(!net.contains(&ip("::ffff:192.168.1.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(&ip("203.0.113.1")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(&ip("fd12::1")) && !v6.contains(&ip("fe80::1")));
        let host: Cidr = "::1/128".parse().unwrap();
        assert!(host.contains(&ip("::1")) && !host.contains(&ip("::2")));
    }
}
