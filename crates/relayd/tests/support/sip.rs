//! Raw SIP over loopback sockets: the OPTIONS probe that tells a relay or a sipp server is
//! ready, and a terminal speaking raw SIP over UDP that answers digest challenges with
//! `sip_core::digest` (RFC 3261 §22, RFC 7616).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use sip_core::digest;

use super::sipp::Transport;
use super::{unique, REALM};

/// Sends one out-of-dialog OPTIONS to 127.0.0.1:`port` and says whether a 200 came back
/// within 300 ms.
pub fn options_ping(port: u16, transport: Transport) -> bool {
    match transport {
        Transport::Udp => udp_options(port),
        Transport::Tcp => tcp_options(port).is_some(),
    }
}

pub(super) fn udp_options(port: u16) -> bool {
    udp_options_at(Ipv4Addr::LOCALHOST.into(), port)
}

/// OPTIONS over UDP to `ip`:`port` (IPv4 or IPv6 loopback); whether a 200 came back.
pub(super) fn udp_options_at(ip: IpAddr, port: u16) -> bool {
    let sock = UdpSocket::bind((ip, 0)).unwrap();
    let local = sock.local_addr().unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let req = options_request(SocketAddr::new(ip, port), local, "UDP");
    if sock.send_to(req.as_bytes(), (ip, port)).is_err() {
        return false;
    }
    let mut buf = [0u8; 65_535];
    match sock.recv(&mut buf) {
        Ok(n) => buf[..n].starts_with(b"SIP/2.0 200"),
        Err(_) => false,
    }
}

/// OPTIONS over a new TCP connection; the connection, still open, if a 200 came back.
/// Keep it open while the peer runs: a sipp server counts a connection closed under it as
/// a failed call (FailedTcpClosed), and exits on a reset.
pub(super) fn tcp_options(port: u16) -> Option<TcpStream> {
    tcp_options_at(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

/// OPTIONS over a new TCP connection to `addr`, as [`tcp_options`].
pub(super) fn tcp_options_at(addr: SocketAddr) -> Option<TcpStream> {
    let timeout = Duration::from_millis(300);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    let local = stream.local_addr().ok()?;
    stream
        .write_all(options_request(addr, local, "TCP").as_bytes())
        .ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.starts_with(b"SIP/2.0 200").then_some(stream)
}

fn options_request(to: SocketAddr, local: SocketAddr, transport: &str) -> String {
    let target = format!("sip:{to}");
    out_of_dialog("OPTIONS", &target, local, transport, &unique("ping-"))
}

/// Sends the sipp on 127.0.0.1:`port` an INFO in call `call_id` over UDP, expecting no
/// answer: a go signal from the test to a scenario waiting for it (`<recv request="INFO">`).
pub(super) fn send_info(port: u16, call_id: &str) {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let local = sock.local_addr().unwrap();
    let target = format!("sip:go@127.0.0.1:{port}");
    let req = out_of_dialog("INFO", &target, local, "UDP", call_id);
    sock.send_to(req.as_bytes(), (Ipv4Addr::LOCALHOST, port))
        .unwrap();
}

/// A request `method` without a body to `target` (also its To) from `local` over
/// `transport` ("UDP" or "TCP"), in call `call_id`, outside any dialog.
fn out_of_dialog(
    method: &str,
    target: &str,
    local: SocketAddr,
    transport: &str,
    call_id: &str,
) -> String {
    format!(
        "{method} {target} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {local};branch=z9hG4bK{branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@{REALM}>;tag={tag}\r\n\
         To: <{target}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 {method}\r\n\
         Content-Length: 0\r\n\r\n",
        branch = unique("p"),
        tag = unique("t"),
    )
}

/// A SIP response as a raw client reads it.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub code: u16,
    /// The reason phrase.
    pub reason: String,
    /// Headers in order, names as sent.
    pub headers: Vec<(String, String)>,
}

impl Response {
    fn parse(bytes: &[u8]) -> Option<Response> {
        let text = std::str::from_utf8(bytes).ok()?;
        let head = text.split("\r\n\r\n").next()?;
        let mut lines = head.split("\r\n");
        let status = lines.next()?.strip_prefix("SIP/2.0 ")?;
        let (code, reason) = status.split_once(' ').unwrap_or((status, ""));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        Some(Response {
            code: code.parse().ok()?,
            reason: reason.to_string(),
            headers,
        })
    }

    /// Every value of header `name` (case-insensitive).
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).into_iter().next()
    }

    /// `code reason`, for messages.
    pub fn status(&self) -> String {
        format!("{} {}", self.code, self.reason)
    }
}

/// A terminal speaking raw SIP over UDP to a relay: REGISTER and INVITE with digest
/// answers computed by `sip_core::digest` (RFC 3261 §22, RFC 7616).
pub struct SipClient {
    sock: UdpSocket,
    local: SocketAddr,
    relay: SocketAddr,
    /// The user name it speaks for.
    pub user: String,
}

impl SipClient {
    /// A client of `user` towards the relay on 127.0.0.1:`relay_port`.
    pub fn new(relay_port: u16, user: &str) -> SipClient {
        SipClient::at(Ipv4Addr::LOCALHOST.into(), relay_port, user)
    }

    /// A client of `user` on `ip` (127.0.0.1 or ::1) towards the relay on `ip`:`relay_port`.
    pub fn at(ip: IpAddr, relay_port: u16, user: &str) -> SipClient {
        let sock = UdpSocket::bind((ip, 0)).unwrap();
        let local = sock.local_addr().unwrap();
        SipClient {
            sock,
            local,
            relay: SocketAddr::new(ip, relay_port),
            user: user.to_string(),
        }
    }

    fn send(&self, text: &str) {
        self.sock.send_to(text.as_bytes(), self.relay).unwrap();
    }

    /// The next final response (provisional ones skipped) whose CSeq is `cseq`, within 10 s.
    fn final_response(&self, cseq: &str) -> Response {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 65_535];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: no final response to {cseq}",
                self.user
            );
            self.sock.set_read_timeout(Some(left)).unwrap();
            let Ok(n) = self.sock.recv(&mut buf) else {
                continue;
            };
            let Some(resp) = Response::parse(&buf[..n]) else {
                continue;
            };
            if resp.code >= 200 && resp.header("CSeq") == Some(cseq) {
                return resp;
            }
        }
    }

    /// REGISTER with `password`, answering the 401; the final response.
    pub fn register(&self, password: &str) -> Response {
        let call_id = unique("reg-");
        let tag = unique("rt");
        let uri = format!("sip:{REALM}");
        let first = self.register_once(&uri, &call_id, &tag, 1, "");
        if first.code != 401 {
            return first;
        }
        let value = answer(
            &first,
            "WWW-Authenticate",
            "REGISTER",
            &uri,
            &self.user,
            password,
        );
        let auth = format!("Authorization: {value}\r\n");
        self.register_once(&uri, &call_id, &tag, 2, &auth)
    }

    fn register_once(
        &self,
        uri: &str,
        call_id: &str,
        tag: &str,
        cseq: u32,
        auth: &str,
    ) -> Response {
        self.send(&format!(
            "REGISTER {uri} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch=z9hG4bK{branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{user}@{REALM}>;tag={tag}\r\n\
             To: <sip:{user}@{REALM}>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: <sip:{user}@{local}>\r\n\
             Expires: 300\r\n{auth}\
             Content-Length: 0\r\n\r\n",
            local = self.local,
            branch = unique("b"),
            user = self.user,
        ));
        self.final_response(&format!("{cseq} REGISTER"))
    }

    /// INVITE `sip:<service>@relay.test` (an application SDP offer), answering each 407
    /// with the next of `passwords`; returns the final response of every INVITE sent (one
    /// more than the passwords used, unless a non-407 ends it first). Non-2xx finals are
    /// ACKed; a 2xx is ACKed and hung up at once.
    pub fn invite(&self, service: &str, passwords: &[&str]) -> Vec<Response> {
        self.invite_uri(&format!("sip:{service}@{REALM}"), passwords)
    }

    /// [`SipClient::invite`] to any Request-URI (`tel:+15551234`…).
    pub fn invite_uri(&self, uri: &str, passwords: &[&str]) -> Vec<Response> {
        let uri = uri.to_string();
        let call_id = unique("inv-");
        let tag = unique("it");
        let (family, ip) = match self.local.ip() {
            IpAddr::V4(ip) => ("IP4", ip.to_string()),
            IpAddr::V6(ip) => ("IP6", ip.to_string()),
        };
        let sdp = format!(
            "v=0\r\no=- 1 1 IN {family} {ip}\r\ns=relay\r\nc=IN {family} {ip}\r\nt=0 0\r\n\
             m=application 9 TCP relay-data\r\na=setup:active\r\na=connection:new\r\n"
        );
        let mut finals = Vec::new();
        let mut auth = String::new();
        let mut passwords = passwords.iter();
        for cseq in 1u32.. {
            let branch = format!("z9hG4bK{}", unique("b"));
            let req = format!(
                "INVITE {uri} SIP/2.0\r\n\
                 Via: SIP/2.0/UDP {local};branch={branch};rport\r\n\
                 Max-Forwards: 70\r\n\
                 From: <sip:{user}@{REALM}>;tag={tag}\r\n\
                 To: <{uri}>\r\n\
                 Call-ID: {call_id}\r\n\
                 CSeq: {cseq} INVITE\r\n\
                 Contact: <sip:{user}@{local}>\r\n{auth}\
                 Content-Type: application/sdp\r\n\
                 Content-Length: {len}\r\n\r\n{sdp}",
                local = self.local,
                user = self.user,
                len = sdp.len(),
            );
            self.send(&req);
            let resp = self.final_response(&format!("{cseq} INVITE"));
            let to = resp.header("To").unwrap_or_default().to_string();
            // In a dialog (2xx) requests go to the remote target, the 2xx's Contact.
            let target = match resp.header("Contact") {
                Some(c) if resp.code < 300 => c
                    .split('<')
                    .nth(1)
                    .and_then(|c| c.split('>').next())
                    .unwrap_or(&uri)
                    .to_string(),
                _ => uri.clone(),
            };
            // ACK: for a non-2xx part of the INVITE transaction (same branch, RFC 3261
            // §17.1.1.3); for a 2xx its own transaction (then a BYE ends the call).
            let ack_branch = if resp.code >= 300 {
                branch.clone()
            } else {
                format!("z9hG4bK{}", unique("b"))
            };
            let dialog = Dialog {
                target: &target,
                tag: &tag,
                to: &to,
                call_id: &call_id,
            };
            self.send_in(&dialog, "ACK", &ack_branch, cseq);
            let code = resp.code;
            finals.push(resp);
            if code < 300 {
                self.send_in(&dialog, "BYE", &format!("z9hG4bK{}", unique("b")), cseq + 1);
                break;
            }
            if code != 407 {
                break;
            }
            let Some(password) = passwords.next() else {
                break;
            };
            let last = finals.last().unwrap();
            let value = answer(
                last,
                "Proxy-Authenticate",
                "INVITE",
                &uri,
                &self.user,
                password,
            );
            auth = format!("Proxy-Authorization: {value}\r\n");
        }
        finals
    }
    /// Sends `method` (ACK or BYE, no body) within `dialog` on transaction `branch`.
    fn send_in(&self, dialog: &Dialog<'_>, method: &str, branch: &str, cseq: u32) {
        self.send(&format!(
            "{method} {target} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {local};branch={branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{user}@{REALM}>;tag={tag}\r\n\
             To: {to}\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} {method}\r\n\
             Content-Length: 0\r\n\r\n",
            target = dialog.target,
            local = self.local,
            user = self.user,
            tag = dialog.tag,
            to = dialog.to,
            call_id = dialog.call_id,
        ));
    }
}

/// Where the requests of an INVITE's dialog (or of its non-2xx ACK) go and what they carry.
struct Dialog<'a> {
    /// The Request-URI: the 2xx's Contact, or the INVITE's URI.
    target: &'a str,
    /// The From tag.
    tag: &'a str,
    /// The To header of the final response, tag included.
    to: &'a str,
    call_id: &'a str,
}

/// The credentials answering the strongest challenge in `resp`'s `header`s.
fn answer(
    resp: &Response,
    header: &str,
    method: &str,
    uri: &str,
    user: &str,
    password: &str,
) -> String {
    let challenges = resp.all(header);
    assert!(!challenges.is_empty(), "{} without {header}", resp.status());
    let challenge = digest::best_challenge(challenges).unwrap();
    challenge
        .answer(method, uri, user, password, &digest::new_cnonce(), 1)
        .unwrap()
        .to_header_value()
}
