//! Property tests: the wire layer and the stream decoder never panic, whatever the bytes.
//!
//! Inputs are random bytes, and RFC 4475 messages mutated at random (bytes flipped, SIP
//! punctuation inserted, ranges deleted, lines duplicated, truncation). Besides "no panic",
//! the properties check what must hold of every outcome: a message the wire layer accepts can
//! be serialised and read back; an answer from `reject` is a well-formed response; and the
//! stream decoder frames a sequence of messages the same way however the stream is cut.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use sip_core::framing::{Frame, StreamDecoder};
use sip_core::message;
use sip_core::rsip::SipMessage;
use sip_core::wire;

const CORPUS: [&[u8]; 16] = [
    include_bytes!("rfc4475/valid/wsinv.dat"),
    include_bytes!("rfc4475/valid/intmeth.dat"),
    include_bytes!("rfc4475/valid/esc01.dat"),
    include_bytes!("rfc4475/valid/escnull.dat"),
    include_bytes!("rfc4475/valid/lwsdisp.dat"),
    include_bytes!("rfc4475/valid/longreq.dat"),
    include_bytes!("rfc4475/valid/dblreq.dat"),
    include_bytes!("rfc4475/valid/transports.dat"),
    include_bytes!("rfc4475/valid/mpart01.dat"),
    include_bytes!("rfc4475/valid/unreason.dat"),
    include_bytes!("rfc4475/valid/noreason.dat"),
    include_bytes!("rfc4475/invalid/badinv01.dat"),
    include_bytes!("rfc4475/invalid/quotbal.dat"),
    include_bytes!("rfc4475/invalid/baddn.dat"),
    include_bytes!("rfc4475/invalid/scalar02.dat"),
    include_bytes!("rfc4475/invalid/bigcode.dat"),
];

/// Bytes that mean something to a SIP parser.
const PUNCTUATION: [&[u8]; 22] = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n ",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b",",
    b";",
    b":",
    b"=",
    b"\"",
    b"\\",
    b"<",
    b">",
    b"[",
    b"]",
    b"@",
    b"%00",
    b"/",
    b"\xff",
    b"\x00",
];

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, byte: u8 },
    Insert { at: usize, what: usize },
    Delete { at: usize, len: usize },
    DuplicateLine { at: usize },
    Truncate { at: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Flip { at, byte }),
        (any::<usize>(), 0..PUNCTUATION.len()).prop_map(|(at, what)| Mutation::Insert { at, what }),
        (any::<usize>(), 1usize..40).prop_map(|(at, len)| Mutation::Delete { at, len }),
        any::<usize>().prop_map(|at| Mutation::DuplicateLine { at }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn apply(mut msg: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = msg.len().max(1);
        match *m {
            Mutation::Flip { at, byte } => {
                if let Some(b) = msg.get_mut(at % len) {
                    *b = byte;
                }
            }
            Mutation::Insert { at, what } => {
                let at = at % (msg.len() + 1);
                msg.splice(at..at, PUNCTUATION[what].iter().copied());
            }
            Mutation::Delete { at, len: n } => {
                let at = at % len;
                let end = (at + n).min(msg.len());
                if at < end {
                    msg.drain(at..end);
                }
            }
            Mutation::DuplicateLine { at } => {
                let at = at % len;
                let start = msg[..at.min(msg.len())]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1);
                let end = msg[start..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(msg.len(), |p| start + p + 1);
                let line = msg[start..end].to_vec();
                msg.splice(start..start, line);
            }
            Mutation::Truncate { at } => msg.truncate(at % len),
        }
    }
    msg
}

/// Runs the wire layer on `bytes` and checks what must hold of every outcome.
fn check(bytes: &[u8]) {
    match wire::parse(bytes) {
        Ok(msg) => {
            // What we accept, we can send on and read back.
            let out = message::to_bytes(msg.clone());
            let again = wire::parse(&out).unwrap_or_else(|e| {
                panic!(
                    "accepted {:?}\nbut not our own rendering {:?}: {e:?}",
                    String::from_utf8_lossy(bytes),
                    String::from_utf8_lossy(&out)
                )
            });
            assert_eq!(again.body(), msg.body());
            assert_eq!(again.is_request(), msg.is_request());
        }
        Err(err) => {
            assert!(!err.reason().contains(['\r', '\n']));
            if let Some(answer) = wire::reject(bytes, &err) {
                check_answer(&answer);
            }
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
    assert_eq!(
        answer.windows(4).filter(|w| w == b"\r\n\r\n").count(),
        1,
        "{text:?}"
    );
}

fn decode_all(decoder: &mut StreamDecoder, buf: &mut BytesMut, out: &mut Vec<Frame>) -> bool {
    loop {
        match decoder.decode(buf) {
            Ok(Some(frame)) => out.push(frame),
            Ok(None) => return true,
            Err(_) => return false,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
        check(&bytes);
        let mut decoder = StreamDecoder::new(1024);
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = decode_all(&mut decoder, &mut buf, &mut Vec::new());
    }

    #[test]
    fn sip_like_noise_never_panics(
        parts in proptest::collection::vec(
            prop_oneof![
                (0..PUNCTUATION.len()).prop_map(|i| PUNCTUATION[i].to_vec()),
                "[A-Za-z0-9.-]{1,8}".prop_map(String::into_bytes),
                Just(b"SIP/2.0".to_vec()),
                Just(b"INVITE sip:a@b SIP/2.0\r\n".to_vec()),
                Just(b"Via: SIP/2.0/UDP h;branch=z9hG4bK1\r\n".to_vec()),
                Just(b"Content-Length: ".to_vec()),
                Just(b"CSeq: 1 INVITE\r\n".to_vec()),
            ],
            0..60,
        )
    ) {
        check(&parts.concat());
    }

    #[test]
    fn mutated_torture_messages_never_panic(
        which in 0..CORPUS.len(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let bytes = apply(CORPUS[which].to_vec(), &mutations);
        check(&bytes);
    }

    #[test]
    fn stream_framing_does_not_depend_on_how_the_stream_is_cut(
        picks in proptest::collection::vec((0..4usize, any::<bool>()), 1..6),
        cuts in proptest::collection::vec(1usize..200, 1..40),
    ) {
        // Messages that carry a Content-Length, some preceded by keep-alives.
        let sources: [&[u8]; 4] = [CORPUS[0], CORPUS[2], CORPUS[8], CORPUS[9]];
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (i, ping) in &picks {
            if *ping {
                stream.extend_from_slice(b"\r\n\r\n");
                expected.push(Frame::Ping);
            }
            // Each corpus file may carry trailing bytes beyond its Content-Length: frame
            // exactly the message.
            let full = sources[*i];
            let msg = match wire::parse(full) {
                Ok(_) => frame_of(full),
                Err(e) => panic!("corpus message does not parse: {e:?}"),
            };
            stream.extend_from_slice(&msg);
            expected.push(Frame::Message(Bytes::from(msg)));
        }
        let mut decoder = StreamDecoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut rest = &stream[..];
        let mut cut = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*cut.next().unwrap()).min(rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            prop_assert!(decode_all(&mut decoder, &mut buf, &mut got));
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, expected);
    }
}

/// The bytes of the message at the front of `datagram`: header block plus Content-Length.
fn frame_of(datagram: &[u8]) -> Vec<u8> {
    let end = datagram.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let msg = match wire::parse(datagram).unwrap() {
        SipMessage::Request(r) => r.body.len(),
        SipMessage::Response(r) => r.body.len(),
    };
    datagram[..end + msg].to_vec()
}
