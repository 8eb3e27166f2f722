//! Who traffic comes from, for limits kept per source: a [`SourceKey`] (an IPv4 address, or
//! the /64 prefix of an IPv6 address) and [`Net`], a network in CIDR notation for lists of
//! sources exempt from a limit.
//!
//! One host usually holds a whole IPv6 /64 (RFC 4291 §2.5.1), so counting IPv6 sources by
//! full address would let one host count as 2^64 sources; an IPv4-mapped IPv6 address
//! counts as its IPv4 address. RFC 3261 §26.1.5 names flooding by a source as the denial of
//! service a SIP element must expect.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Where traffic comes from, as limits count it: an IPv4 address or an IPv6 /64 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceKey {
    /// An IPv4 address (also an IPv4-mapped IPv6 one).
    V4(u32),
    /// The upper 64 bits of an IPv6 address.
    V6Prefix(u64),
}

impl SourceKey {
    /// The source `ip` counts as.
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(v4) => SourceKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(u32::from(v4)),
                None => SourceKey::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// An IP network in CIDR notation (`127.0.0.0/8`, `::1/128`; a bare address is a single
/// host), for lists of sources a limit does not apply to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

/// A network that is not written as `address/prefix`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected a network like 127.0.0.0/8, got {0:?}")]
pub struct BadNet(pub String);

impl Net {
    /// The network of `addr` with the first `prefix` bits significant; `None` if the prefix
    /// is longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Net> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Net { addr, prefix })
    }

    /// The loopback networks, `127.0.0.0/8` and `::1/128`.
    pub fn loopback() -> [Net; 2] {
        [
            Net {
                addr: IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 0)),
                prefix: 8,
            },
            Net {
                addr: IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
                prefix: 128,
            },
        ]
    }

    /// Whether `ip` is in the network. An IPv4-mapped IPv6 address counts as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Net {
    type Err = BadNet;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadNet(s.to_owned());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().map_err(|_| bad())?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Net::new(addr, prefix).ok_or_else(bad)
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_prefixes() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            SourceKey::of(ip("2001:db8::1")),
            SourceKey::of(ip("2001:db8::ffff:2")),
            "one /64"
        );
        assert_ne!(
            SourceKey::of(ip("2001:db8:0:1::1")),
            SourceKey::of(ip("2001:db8::1"))
        );
        assert_eq!(
            SourceKey::of(ip("::ffff:10.0.0.1")),
            SourceKey::of(ip("10.0.0.1"))
        );
        assert_ne!(SourceKey::of(ip("10.0.0.1")), SourceKey::of(ip("10.0.0.2")));
    }

    #[test]
    fn networks_parse_and_contain() {
        let net: Net = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert_eq!(net.to_string(), "10.1.0.0/16");
        let all: Net = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        let host: Net = "::1".parse().unwrap();
        assert_eq!(host.to_string(), "::1/128");
        let [v4, v6] = Net::loopback();
        assert!(v4.contains("127.0.0.3".parse().unwrap()));
        assert!(v6.contains("::1".parse().unwrap()));
        assert!(!v4.contains("128.0.0.1".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "::/129", "nowhere", "10.0.0.0/x"] {
            assert!(bad.parse::<Net>().is_err(), "{bad}");
        }
    }
}
