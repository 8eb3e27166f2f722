//! What the endpoint tests share: an endpoint on loopback UDP and a raw out-of-dialog
//! request between two of them.
#![allow(clippy::unwrap_used, dead_code)]

use std::net::SocketAddr;

use rsip::{Request, SipMessage};
use sip_core::endpoint::EndpointConfig;
use sip_core::transport::TransportConfig;
use sip_core::{message, wire};

/// An endpoint configuration listening on a free loopback UDP port.
pub fn loopback() -> EndpointConfig {
    EndpointConfig {
        transport: TransportConfig {
            udp: vec!["127.0.0.1:0".parse().unwrap()],
            ..TransportConfig::default()
        },
        ..EndpointConfig::default()
    }
}

/// An out-of-dialog request from `from` to `to`, with a fresh branch and Call-ID.
pub fn request(method: &str, from: SocketAddr, to: SocketAddr) -> Request {
    let text = format!(
        "{method} sip:uas@{to} SIP/2.0\r\n\
         Via: SIP/2.0/UDP {from};branch={};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:uac@{from}>;tag={}\r\n\
         To: <sip:uas@{to}>\r\n\
         Call-ID: {}\r\n\
         CSeq: 1 {method}\r\n\
         Content-Length: 0\r\n\r\n",
        message::new_branch(),
        message::new_tag(),
        message::new_call_id("127.0.0.1"),
    );
    match wire::parse(text.as_bytes()).unwrap() {
        SipMessage::Request(r) => r,
        SipMessage::Response(_) => unreachable!(),
    }
}
