//! The checks behind the fuzz targets of `fuzz_targets/`, one module per target.
//!
//! Each `check` takes the fuzzer's bytes, feeds them to one part of sip-core as the network
//! would, and panics (which libFuzzer reports as a crash) if sip-core panics or if a property
//! that must hold of every outcome does not: what the wire layer accepts, it can serialise
//! and read back; a stream is framed the same however it is cut; what a parser accepts,
//! its own rendering of it parses again; a digest answer made for a challenge verifies; the
//! transaction layer sends only what the wire layer reads, never schedules a deadline in the
//! past, and keeps no server transaction once every deadline has passed.
//!
//! The modules are a library so that `cargo test` in this directory (no libFuzzer needed)
//! replays the corpus through them.

/// The fuzzer's bytes as text: as is when UTF-8, else lossily.
fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// Target `wire`: the message parser (`wire::parse`, `wire::reject`) and the helpers that
/// read a parsed message (`message`, `fields`, dialog ids) — the path of every datagram.
pub mod wire {
    use sip_core::dialog::DialogId;
    use sip_core::message::{self, RequestIds, Summary};
    use sip_core::rsip::prelude::*;
    use sip_core::rsip::{Header, SipMessage};
    use sip_core::wire;

    /// Parses `data` as one message off the wire.
    pub fn check(data: &[u8]) {
        match wire::parse(data) {
            Ok(msg) => accepted(data, msg),
            Err(err) => {
                assert!(!err.reason().contains(['\r', '\n']), "{err:?}");
                if let Some(answer) = wire::reject(data, &err) {
                    check_answer(&answer);
                }
            }
        }
    }

    /// What must hold of an accepted message.
    fn accepted(data: &[u8], msg: SipMessage) {
        // What we accept, we can send on and read back.
        let out = message::to_bytes(msg.clone());
        let again = wire::parse(&out).unwrap_or_else(|e| {
            panic!(
                "accepted {:?}\nbut not our own rendering {:?}: {e:?}",
                String::from_utf8_lossy(data),
                String::from_utf8_lossy(&out)
            )
        });
        assert_eq!(again.body(), msg.body());
        assert_eq!(again.is_request(), msg.is_request());

        // The readers every layer above uses.
        let _ = Summary::of(&msg);
        for h in msg.headers().iter() {
            if let Header::Via(v) = h {
                if let Some(view) = sip_core::fields::ViaView::parse(v.value()) {
                    let _ = (
                        view.branch(),
                        view.host_ip(),
                        view.received(),
                        view.sent_by(),
                    );
                    let _ = view.params().count();
                }
            }
        }
        match msg {
            SipMessage::Request(mut req) => {
                let _ = RequestIds::read(&req);
                let _ = DialogId::of_incoming_request(&req);
                let _ = message::check_max_forwards(&req);
                let _ = message::response_target(&req);
                for code in [100, 180, 200, 401, 487] {
                    let resp = message::response_for(&req, code, None, Some("fuzz"));
                    let bytes = message::to_bytes(resp);
                    if let Err(e) = wire::parse(&bytes) {
                        panic!(
                            "our {code} to {:?} does not parse: {:?}: {e:?}",
                            String::from_utf8_lossy(data),
                            String::from_utf8_lossy(&bytes)
                        );
                    }
                }
                let _ = message::response_headers_only(&req);
                let _ = message::decrement_max_forwards(&mut req);
                message::stamp_received(
                    &mut req,
                    "192.0.2.1:5070".parse().unwrap_or_else(|_| unreachable!()),
                );
                let _ = message::response_target(&req);
                let _ = message::to_bytes(req);
            }
            SipMessage::Response(resp) => {
                let _ = DialogId::of_response(&resp);
            }
        }
    }

    /// An answer from `reject` is a well-formed response with an empty body.
    fn check_answer(answer: &[u8]) {
        let text = String::from_utf8_lossy(answer);
        assert!(answer.starts_with(b"SIP/2.0 "), "{text:?}");
        assert!(answer.ends_with(b"Content-Length: 0\r\n\r\n"), "{text:?}");
        let head = &answer[..answer.len() - 2];
        for line in head.split(|&b| b == b'\n') {
            if !line.is_empty() {
                assert!(line.ends_with(b"\r"), "bare LF in {text:?}");
                assert!(
                    !line[..line.len() - 1].contains(&b'\r'),
                    "stray CR in {text:?}"
                );
            }
        }
    }
}

/// Target `framing`: the stream decoder of TCP and TLS connections.
pub mod framing {
    use bytes::BytesMut;
    use sip_core::framing::{Frame, FramingError, StreamDecoder};

    /// Frames `data` as one stream, at two message limits, once whole and once cut into
    /// pieces whose sizes come from the bytes themselves (so a seed that is a plain message
    /// is a good input): the frames and the error, if any, must be the same. Each message
    /// framed goes on to the wire parser, as the transport sends it.
    pub fn check(data: &[u8]) {
        for limit in [StreamDecoder::DEFAULT_MAX, 300] {
            let whole = frames(data, limit, &mut std::iter::once(data.len().max(1)));
            let mut cuts = data.iter().cycle().map(|b| usize::from(b % 97) + 1);
            let cut = frames(data, limit, &mut cuts);
            assert_eq!(
                whole,
                cut,
                "framing depends on how the stream is cut: {:?}",
                String::from_utf8_lossy(data)
            );
            for frame in &whole.0 {
                if let Frame::Message(bytes) = frame {
                    assert!(bytes.len() <= limit);
                    let _ = sip_core::wire::parse(bytes);
                }
            }
        }
    }

    type Outcome = (Vec<Frame>, Option<FramingError>, usize);

    /// The frames of `data` fed in pieces of the sizes `cuts` gives, the error that ended the
    /// stream if one did, and how many bytes were left unframed.
    fn frames(data: &[u8], limit: usize, cuts: &mut dyn Iterator<Item = usize>) -> Outcome {
        let mut decoder = StreamDecoder::new(limit);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let n = cuts.next().unwrap_or(rest.len()).clamp(1, rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => out.push(frame),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e), 0),
                }
            }
        }
        (out, None, buf.len())
    }
}

/// Target `sdp`: the SDP parser and the relay's application SDP.
pub mod sdp {
    use sip_core::sdp::{AppSdp, Sdp};

    /// Parses `data` as an SDP body; what parses, its rendering parses again to the same.
    pub fn check(data: &[u8]) {
        if let Ok(sdp) = Sdp::parse(data) {
            let _ = (sdp.session_attribute("setup"), sdp.session_value('c'));
            for m in &sdp.media {
                let _ = (m.media_type(), m.port(), m.proto(), m.formats().count());
                let _ = (m.attribute("session-token"), m.connection());
            }
            let _ = sdp.lines().count();
            let printed = sdp.to_string();
            let again = Sdp::parse(printed.as_bytes())
                .unwrap_or_else(|e| panic!("our rendering {printed:?} does not parse: {e:?}"));
            assert_eq!(again, sdp, "{printed:?}");
            let _ = AppSdp::from_sdp(&sdp);
        }
        if let Ok(app) = AppSdp::parse(data) {
            let _ = (app.socket_addr(), app.setup_or_default(true));
            let _ = app.token_matches(data);
            let printed = app.to_string();
            let again = AppSdp::parse(printed.as_bytes())
                .unwrap_or_else(|e| panic!("our rendering {printed:?} does not parse: {e:?}"));
            assert_eq!(again.socket_addr(), app.socket_addr(), "{printed:?}");
            assert_eq!(again.token, app.token, "{printed:?}");
            assert_eq!(again.service, app.service, "{printed:?}");
        }
    }
}

/// Target `digest`: `Authorization` / `WWW-Authenticate` values, and their verification.
pub mod digest {
    use std::time::Duration;

    use sip_core::digest::{
        best_challenge, Challenge, Credentials, DigestServer, StoredCredential,
    };

    const NOW: u64 = 1_700_000_000;

    /// The first line of `data` is a header value, parsed both as a challenge and as
    /// credentials; the next four (if any) are a user, a password, a Request-URI and a
    /// method. Checks that what parses renders and parses again to the same, that fuzzed
    /// credentials never verify against a server's own nonce, and that the answer a
    /// client makes to the server's challenge with the fuzzed user and password verifies.
    pub fn check(data: &[u8]) {
        let text = super::text(data);
        let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
        let value = lines.next().unwrap_or_default();
        let user = lines.next().unwrap_or("alice");
        let password = lines.next().unwrap_or("secret");
        let uri = lines.next().unwrap_or("sip:example.test");
        let method = lines.next().unwrap_or("REGISTER");

        let server = DigestServer::new("example.test", [7; 32], Duration::from_secs(300));
        let stored = StoredCredential::from_password(user, "example.test", password);

        if let Ok(challenge) = Challenge::parse(value) {
            let printed = challenge.to_header_value();
            let again = Challenge::parse(&printed)
                .unwrap_or_else(|e| panic!("our rendering {printed:?} does not parse: {e:?}"));
            assert_eq!(again, challenge, "{printed:?}");
            if let Ok(creds) = challenge.answer(method, uri, user, password, "0a4f113b", 1) {
                let _ = Credentials::parse(&creds.to_header_value());
            }
        }
        let _ = best_challenge(text.split('\n'));

        if let Ok(creds) = Credentials::parse(value) {
            let printed = creds.to_header_value();
            let again = Credentials::parse(&printed)
                .unwrap_or_else(|e| panic!("our rendering {printed:?} does not parse: {e:?}"));
            assert_eq!(again, creds, "{printed:?}");
            let _ = creds.uri_matches(uri);
            let _ = creds.expected_response(stored.md5_ha1().unwrap_or_default(), method);
            let verdict = server.verify(&creds, method, |_| Some(stored.clone()), NOW);
            // Only a nonce made by the server's key can pass: the fuzzer does not have it.
            assert!(verdict.is_err(), "fuzzed credentials verified: {creds:?}");
        }

        // A real exchange with the fuzzed user, password, URI and method: one answer to
        // each challenge (one per algorithm, all sharing one nonce, so the nonce-count
        // grows).
        for (nc, value) in (1..).zip(server.challenge(NOW, false)) {
            let challenge = Challenge::parse(&value).unwrap_or_else(|e| panic!("{value}: {e:?}"));
            let Ok(answer) = challenge.answer(method, uri, user, password, "0a4f113b", nc) else {
                continue;
            };
            let header = answer.to_header_value();
            let Ok(parsed) = Credentials::parse(&header) else {
                // A user, URI or method a header cannot carry (a line break, a quote…).
                assert!(
                    !printable(user) || !printable(uri) || !token(method),
                    "{header:?}"
                );
                continue;
            };
            if parsed.username != user || parsed.uri != uri {
                assert!(!printable(user) || !printable(uri), "{header:?}");
                continue;
            }
            let verified = server.verify(&parsed, method, |_| Some(stored.clone()), NOW + 1);
            assert!(
                verified.is_ok() || !printable(user) || !token(method),
                "{header:?}: {verified:?}"
            );
            // The same answer again is a replay.
            if verified.is_ok() {
                let again = server.verify(&parsed, method, |_| Some(stored.clone()), NOW + 2);
                assert!(again.is_err(), "replayed nonce-count accepted: {header:?}");
            }
        }
    }

    /// Text a quoted string carries as is: printable ASCII without quote or backslash.
    fn printable(s: &str) -> bool {
        s.bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    }

    /// A method name.
    fn token(s: &str) -> bool {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b))
    }
}

/// Target `uri`: SIP, SIPS and tel URIs, name-addrs and the headers made of them.
pub mod uri {
    use sip_core::address::{
        self, parse_asserted_identity, parse_list, parse_routes, Contact, Contacts, FromTo,
        NameAddr, ReferTo, ServiceId,
    };
    use sip_core::uri::{percent_decode, Uri};

    /// Each line of `data` is parsed as a URI and as every header value made of addresses;
    /// what parses, renders and parses again to the same.
    pub fn check(data: &[u8]) {
        let text = super::text(data);
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            one(line);
        }
        // The whole input as one value too (folded and multi-line values).
        one(&text);
    }

    fn one(value: &str) {
        if let Ok(uri) = Uri::parse(value) {
            uri_accessors(&uri);
            let printed = uri.to_string();
            let again = Uri::parse(&printed)
                .unwrap_or_else(|e| panic!("our rendering {printed:?} does not parse: {e:?}"));
            assert_eq!(again, uri);
            let carried = uri.to_rsip();
            let _ = Uri::from_rsip(&carried);
            let line = uri.for_request_line();
            let _ = Uri::parse(line.as_str());
        }
        let _ = percent_decode(value);
        let quoted = address::quote(value);
        let _ = address::unquote(&quoted);
        let _ = address::unquote(value);

        if let Ok(addr) = NameAddr::parse(value) {
            name_addr(&addr);
        }
        if let Ok(list) = parse_list(value) {
            list.iter().for_each(name_addr);
        }
        if let Ok(ft) = FromTo::parse(value) {
            let _ = ft.tag();
            name_addr(ft.address());
        }
        if let Ok(c) = Contact::parse(value) {
            let _ = (c.instance(), c.reg_id(), c.is_outbound());
            name_addr(c.address());
        }
        if let Ok(Contacts::List(list)) = Contacts::parse(value) {
            list.iter().for_each(|c| name_addr(c.address()));
        }
        if let Ok(routes) = parse_routes(value) {
            routes.iter().for_each(name_addr);
        }
        if let Ok(ids) = parse_asserted_identity(value) {
            ids.iter().for_each(name_addr);
        }
        if let Ok(r) = ReferTo::parse(value) {
            uri_accessors(r.uri());
        }
        if let Ok(s) = ServiceId::parse(value) {
            let _ = format!("{s:?}");
        }
    }

    fn uri_accessors(uri: &Uri) {
        let _ = (
            uri.scheme(),
            uri.scheme_str(),
            uri.rest(),
            uri.is_sips(),
            uri.is_sip(),
        );
        let _ = (uri.user(), uri.user_decoded(), uri.password());
        let _ = uri.host().map(|h| h.to_string());
        let _ = (uri.host_text(), uri.port(), uri.host_port_text());
        let _ = uri.params().count();
        let _ = (
            uri.param("transport"),
            uri.param_decoded("user"),
            uri.has_param("lr"),
        );
        let _ = (
            uri.transport(),
            uri.is_loose_router(),
            uri.headers().count(),
        );
        let _ = (uri.tel_number(), uri.tel_number_text(), uri.is_global_tel());
    }

    fn name_addr(addr: &NameAddr) {
        let _ = (
            addr.display_name(),
            addr.display_name_raw(),
            addr.is_name_addr(),
        );
        let _ = (addr.params().count(), addr.params_text(), addr.tag());
        let _ = (
            addr.expires(),
            addr.q_millis(),
            addr.q(),
            addr.param("expires"),
        );
        uri_accessors(addr.uri());
        let printed = addr.to_string();
        let again = NameAddr::parse(&printed)
            .unwrap_or_else(|e| panic!("our rendering {printed:?} does not parse: {e:?}"));
        assert_eq!(again.uri(), addr.uri(), "{printed:?}");
        let _ = addr.without_param("tag");
        if let Ok(with) = addr.with_param("x-fuzz", Some("1")) {
            assert_eq!(with.param("x-fuzz").flatten().as_deref(), Some("1"));
        }
        let rebuilt = NameAddr::new(addr.display_name().as_deref(), addr.uri());
        let _ = NameAddr::parse(rebuilt.as_str()).unwrap_or_else(|e| {
            panic!("NameAddr::new gave {rebuilt:?}, which does not parse: {e:?}")
        });
    }
}

/// Target `transaction`: the sans-IO transaction layer (both server and client machines),
/// driven by a script of messages, user actions and the passing of time.
///
/// The input is text: steps, each beginning on a line that starts with `@` (text before the
/// first such line is a message from peer 0 over UDP):
///
/// | step | what happens |
/// |---|---|
/// | `@in P T` + message on the next lines | bytes off the wire from peer `P` over `T` (`udp`/`tcp`), through `wire::parse` |
/// | `@send P T` + request | the user starts a client transaction towards peer `P` |
/// | `@respond N CODE` | the user answers the `N`th server transaction it was given |
/// | `@reply N CODE` | the peer answers the `N`th request we sent (a response made from it) |
/// | `@ack N`, `@cancel N` | the peer follows the `N`th message it sent with an ACK or CANCEL of its branch |
/// | `@again N` | the `N`th message delivered, again (a retransmission) |
/// | `@wait MS` | the clock moves on; the timers due run |
/// | `@lost P T` | the transport cannot reach the peer |
/// | `@timers T1 T2 T4` | (first step only) the timer values, in milliseconds |
/// | `@deadlines INVITE NONINVITE` | (first step only) the server deadlines, in milliseconds |
///
/// Numbers that do not parse count as 0. After each step the output is drained (every
/// transmission must parse with `wire::parse`; the next deadline must lie ahead) and the
/// timers due are run. At the end the clock runs through every deadline: no server
/// transaction may be left.
pub mod transaction {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use sip_core::message::response_for;
    use sip_core::rsip::prelude::*;
    use sip_core::rsip::{self, Header, Method, Request, SipMessage};
    use sip_core::transaction::{
        Event, Output, ServerDeadlines, ServerTxId, Timers, TransactionLayer,
    };
    use sip_core::{wire, Peer, Transport};

    const PEERS: [&str; 3] = ["192.0.2.1:5060", "192.0.2.2:5060", "[2001:db8::1]:5070"];
    /// Steps run at most (more would only make a slow input).
    const MAX_STEPS: usize = 256;

    fn peer(args: &[&str]) -> Peer {
        let i = args
            .first()
            .and_then(|a| a.parse::<usize>().ok())
            .unwrap_or(0);
        let addr: SocketAddr = PEERS[i % PEERS.len()]
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let transport = match args.get(1) {
            Some(t) if t.eq_ignore_ascii_case("tcp") => Transport::Tcp,
            _ => Transport::Udp,
        };
        Peer {
            transport,
            addr,
            conn: None,
        }
    }

    fn num<T: std::str::FromStr + Default>(args: &[&str], i: usize) -> T {
        args.get(i).and_then(|a| a.parse().ok()).unwrap_or_default()
    }

    /// The script's steps: (directive words, payload).
    fn steps(data: &[u8]) -> Vec<(Vec<&str>, &[u8])> {
        let mut out = Vec::new();
        let mut starts = vec![0];
        for (i, w) in data.windows(2).enumerate() {
            if w == b"\n@" {
                starts.push(i + 1);
            }
        }
        starts.push(data.len());
        for w in starts.windows(2) {
            let chunk = &data[w[0]..w[1]];
            let Some(rest) = chunk.strip_prefix(b"@") else {
                if !chunk.is_empty() {
                    out.push((vec!["in"], chunk));
                }
                continue;
            };
            let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            let line = std::str::from_utf8(&rest[..end]).unwrap_or("");
            let payload = rest.get(end + 1..).unwrap_or_default();
            out.push((line.split_whitespace().collect(), payload));
            if out.len() >= MAX_STEPS {
                break;
            }
        }
        out
    }

    /// What the run has seen so far.
    #[derive(Default)]
    struct World {
        /// Server transactions the user was given, with their requests.
        requests: Vec<(ServerTxId, Request)>,
        /// Requests we sent, with where to.
        sent: Vec<(Request, Peer)>,
        /// Messages delivered, with where from.
        delivered: Vec<(SipMessage, Peer)>,
    }

    /// Drains the layer: checks every transmission and remembers new server transactions.
    fn drain(layer: &mut TransactionLayer, world: &mut World) -> Option<Instant> {
        loop {
            match layer.poll_output() {
                Output::Transmit(t) => {
                    assert!(!t.bytes.is_empty());
                    if let Err(e) = wire::parse(&t.bytes) {
                        panic!(
                            "the layer sent what the wire layer refuses: {:?}: {e:?}",
                            String::from_utf8_lossy(&t.bytes)
                        );
                    }
                }
                Output::Event(Event::Request { tx, req, .. }) => {
                    world.requests.push((tx, req));
                }
                Output::Event(Event::Cancel {
                    tx, invite, req, ..
                }) => {
                    assert_ne!(tx, invite);
                    world.requests.push((tx, req));
                }
                Output::Event(_) => {}
                Output::Timeout(t) => return t,
            }
        }
    }

    fn pick<T>(items: &[T], n: usize) -> Option<&T> {
        (!items.is_empty()).then(|| &items[n % items.len()])
    }

    /// Runs the script in `data`.
    pub fn check(data: &[u8]) {
        let steps = steps(data);
        let mut timers = Timers::default();
        let mut deadlines = ServerDeadlines::default();
        let mut first = true;
        for (args, _) in &steps {
            match args.first().copied() {
                Some("timers") if first => {
                    timers = Timers {
                        t1: Duration::from_millis(num(args, 1)),
                        t2: Duration::from_millis(num(args, 2)),
                        t4: Duration::from_millis(num(args, 3)),
                    };
                }
                Some("deadlines") if first => {
                    deadlines = ServerDeadlines {
                        invite: Duration::from_millis(num(args, 1)),
                        non_invite: args
                            .get(2)
                            .and_then(|a| a.parse().ok())
                            .map(Duration::from_millis),
                    };
                }
                _ => break,
            }
            first = false;
        }
        let mut layer = TransactionLayer::new(timers).with_server_deadlines(deadlines);
        let t0 = Instant::now();
        let mut now = t0;
        let mut world = World::default();
        for (args, payload) in steps {
            step(&mut layer, &mut world, &mut now, &args, payload);
            drain(&mut layer, &mut world);
            layer.handle_timeout(now);
            if let Some(deadline) = drain(&mut layer, &mut world) {
                assert!(
                    deadline > now,
                    "deadline {:?} not after now {:?}",
                    deadline - t0,
                    now - t0
                );
            }
        }
        // Every deadline passes: no server transaction may be left.
        let end = now + layer.timers().transaction_timeout() * 2 + Duration::from_secs(48 * 3600);
        let mut deadline = drain(&mut layer, &mut world);
        let mut rounds = 0;
        while let Some(at) = deadline.filter(|at| *at <= end) {
            layer.handle_timeout(at);
            deadline = drain(&mut layer, &mut world);
            if let Some(next) = deadline {
                assert!(next > at, "deadline {next:?} not after {at:?}");
            }
            rounds += 1;
            assert!(rounds < 1_000_000, "timers never settle");
        }
        assert_eq!(
            layer.server_len(),
            0,
            "server transactions outlive every deadline"
        );
    }

    fn step(
        layer: &mut TransactionLayer,
        world: &mut World,
        now: &mut Instant,
        args: &[&str],
        payload: &[u8],
    ) {
        let rest = args.get(1..).unwrap_or_default();
        match args.first().copied().unwrap_or("") {
            "in" => {
                if let Ok(msg) = wire::parse(payload) {
                    let from = peer(rest);
                    world.delivered.push((msg.clone(), from));
                    layer.handle_message(*now, msg, from);
                }
            }
            "send" => {
                if let Ok(SipMessage::Request(req)) = wire::parse(payload) {
                    let to = peer(rest);
                    if layer.send_request(*now, req.clone(), to).is_ok() {
                        world.sent.push((req, to));
                    }
                }
            }
            "respond" => {
                let n: usize = num(args, 1);
                if let Some((tx, req)) = pick(&world.requests, n) {
                    let mut resp = response_for(req, 200, None, Some("uas"));
                    resp.status_code = sip_core::message::status(num(args, 2), None);
                    let _ = layer.respond(*now, *tx, resp);
                }
            }
            "reply" => {
                let n: usize = num(args, 1);
                if let Some((req, to)) = pick(&world.sent, n) {
                    let mut resp = response_for(req, 200, None, Some("uas"));
                    resp.status_code = sip_core::message::status(num(args, 2), None);
                    layer.handle_message(*now, SipMessage::Response(resp), *to);
                }
            }
            which @ ("ack" | "cancel") => {
                let n: usize = num(args, 1);
                let picked = pick(&world.delivered, n).cloned();
                if let Some((SipMessage::Request(mut req), from)) = picked {
                    let method = if which == "ack" {
                        Method::Ack
                    } else {
                        Method::Cancel
                    };
                    req.method = method;
                    for h in req.headers.iter_mut() {
                        if let Header::CSeq(c) = h {
                            if let Ok(typed) = c.typed() {
                                *h = rsip::typed::CSeq {
                                    seq: typed.seq,
                                    method,
                                }
                                .into();
                            }
                        }
                    }
                    layer.handle_message(*now, SipMessage::Request(req), from);
                }
            }
            "again" => {
                let n: usize = num(args, 1);
                if let Some((msg, from)) = pick(&world.delivered, n).cloned() {
                    layer.handle_message(*now, msg, from);
                }
            }
            "wait" => *now += Duration::from_millis(num::<u32>(args, 1).into()),
            "lost" => layer.transport_error(&peer(rest)),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every input kept under `corpus/<target>/` (the seeds, and whatever local runs added)
    /// through its target's check, without libFuzzer: `cargo test` in this directory.
    #[test]
    fn the_corpus_passes_every_check() {
        type Check = fn(&[u8]);
        let targets: [(&str, Check); 6] = [
            ("wire", super::wire::check),
            ("framing", super::framing::check),
            ("sdp", super::sdp::check),
            ("digest", super::digest::check),
            ("uri", super::uri::check),
            ("transaction", super::transaction::check),
        ];
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        for (target, check) in targets {
            let Ok(entries) = std::fs::read_dir(root.join(target)) else {
                continue;
            };
            let mut n = 0;
            for entry in entries.flatten() {
                if let Ok(data) = std::fs::read(entry.path()) {
                    check(&data);
                    n += 1;
                }
            }
            assert!(n > 0, "no input for {target}");
        }
    }
}
