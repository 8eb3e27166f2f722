//! Where a message came from or goes to: transport kind, socket address and, for stream
//! transports, the connection it travels on (RFC 3261 §18.2.2: a response goes back on the
//! connection its request came on).

use std::fmt;
use std::net::SocketAddr;

/// The transport protocol a message travels over (RFC 3261 §18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// Unreliable datagrams: the transaction layer retransmits.
    Udp,
    /// A TCP stream, framed by Content-Length.
    Tcp,
    /// TCP with TLS on top.
    Tls,
}

impl Transport {
    /// Whether the transport is reliable, so that retransmission timers are not run and
    /// waiting timers are zero (RFC 3261 §17.1.1.2, §17.1.2.2, §17.2.1, §17.2.2).
    pub fn is_reliable(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    /// The name used in a Via header's sent-protocol (`SIP/2.0/UDP`).
    pub fn via_name(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
        }
    }

    /// The lower-case name used in a URI's `transport=` parameter.
    pub fn param_name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// Parses a transport name as found in a Via or a `transport=` URI parameter,
    /// ignoring case.
    pub fn from_name(name: &str) -> Option<Transport> {
        if name.eq_ignore_ascii_case("udp") {
            Some(Transport::Udp)
        } else if name.eq_ignore_ascii_case("tcp") {
            Some(Transport::Tcp)
        } else if name.eq_ignore_ascii_case("tls") {
            Some(Transport::Tls)
        } else {
            None
        }
    }

    /// The default port of the transport (5060, or 5061 for TLS).
    pub fn default_port(self) -> u16 {
        match self {
            Transport::Tls => 5061,
            _ => 5060,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.via_name())
    }
}

/// Identifies one stream connection of a transport, so a response can be sent back on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub std::num::NonZeroU64);

/// The far end of a message: the transport, the socket address, and for stream transports
/// the connection when one is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The transport the message travels on.
    pub transport: Transport,
    /// The remote socket address.
    pub addr: SocketAddr,
    /// The stream connection the message arrived on, or should leave on. `None` for UDP,
    /// and for a stream peer that has no connection yet (one is opened on demand).
    pub conn: Option<ConnId>,
}

impl Peer {
    /// A UDP peer.
    pub fn udp(addr: SocketAddr) -> Peer {
        Peer {
            transport: Transport::Udp,
            addr,
            conn: None,
        }
    }

    /// A TCP peer with no particular connection (one is reused or opened on send).
    pub fn tcp(addr: SocketAddr) -> Peer {
        Peer {
            transport: Transport::Tcp,
            addr,
            conn: None,
        }
    }

    /// A TLS peer with no particular connection (one is reused or opened on send, verifying
    /// the peer's certificate: RFC 3261 §26.2.1, RFC 5922 §7.1).
    pub fn tls(addr: SocketAddr) -> Peer {
        Peer {
            transport: Transport::Tls,
            addr,
            conn: None,
        }
    }

    /// Whether the transport to this peer is reliable.
    pub fn is_reliable(&self) -> bool {
        self.transport.is_reliable()
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.transport.param_name(), self.addr)
    }
}

#[cfg(test)]
mod tests {
    /// A peer is in every transaction, dialog leg and lingering response: a connection id
    /// that is never zero keeps `Option<ConnId>` at 8 bytes.
    #[test]
    fn a_peer_takes_48_bytes() {
        assert_eq!(std::mem::size_of::<super::Peer>(), 48);
    }
}
