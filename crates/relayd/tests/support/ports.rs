//! Loopback ports for relays and sipp processes.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, UdpSocket};
use std::sync::{Mutex, OnceLock};

/// A loopback port free for both UDP and TCP right now, on 127.0.0.1 and (where the host has
/// IPv6) on ::1, never handed out twice in this test process (tests run in parallel threads).
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..200 {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = tcp.local_addr().unwrap().port();
        let Ok(udp) = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)) else {
            continue;
        };
        let v6 = (
            UdpSocket::bind((Ipv6Addr::LOCALHOST, port)),
            TcpListener::bind((Ipv6Addr::LOCALHOST, port)),
        );
        let in_use = |e: &std::io::Error| e.kind() == std::io::ErrorKind::AddrInUse;
        if v6.0.as_ref().err().is_some_and(in_use) || v6.1.as_ref().err().is_some_and(in_use) {
            continue;
        }
        drop((tcp, udp, v6));
        if given.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("no free loopback port found");
}
