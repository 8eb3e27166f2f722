//! Framing of SIP messages on a stream transport (TCP, TLS): RFC 3261 §18.3 says the body of a
//! message on a stream ends where its Content-Length says, so every message must carry one.
//!
//! [`StreamDecoder`] takes whole frames off the front of the connection's read buffer, in the
//! check-then-parse shape of mini-redis: it first checks, without copying, whether the buffer
//! holds a complete message, and only then splits it off. CRLF keep-alives (RFC 5626 §3.5.1)
//! between messages are skipped, and a double-CRLF ping is reported so the transport can
//! answer with a single CRLF. A message larger than the configured limit is refused before it
//! is buffered whole. The frames go to [`crate::wire::parse`].

use bytes::{Buf, Bytes, BytesMut};

/// One unit taken off a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete message: start line, headers, blank line and exactly Content-Length bytes of
    /// body.
    Message(Bytes),
    /// A double-CRLF keep-alive ping (RFC 5626 §3.5.1); the transport answers it with a single
    /// CRLF pong.
    Ping,
}

/// Why a stream can no longer be framed. After any of these the transport closes the
/// connection: there is no way to find the start of the next message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    /// The message (header block, or header block plus declared body) exceeds the limit.
    #[error("message larger than {limit} bytes")]
    TooLarge {
        /// The decoder's limit.
        limit: usize,
    },
    /// The header block has no Content-Length, which a stream transport requires (§18.3).
    #[error("message without Content-Length on a stream transport")]
    MissingContentLength,
    /// Content-Length is not a decimal number, or two Content-Length headers disagree.
    #[error("malformed Content-Length")]
    BadContentLength,
}

/// Takes SIP messages off a TCP or TLS byte stream (RFC 3261 §18.3).
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    max_message: usize,
    /// How far the search for the end of the header block has got in the current buffer, so
    /// a message arriving in small pieces is not rescanned from the start on every read.
    scanned: usize,
    /// Once the header block of the message at the front is complete: its total length.
    pending_total: Option<usize>,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        StreamDecoder::new(StreamDecoder::DEFAULT_MAX)
    }
}

impl StreamDecoder {
    /// The default limit on one message: 64 KiB.
    pub const DEFAULT_MAX: usize = 64 * 1024;

    /// A decoder refusing messages larger than `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        StreamDecoder {
            max_message,
            scanned: 0,
            pending_total: None,
        }
    }

    /// The limit on one message.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Takes the next whole frame off the front of `buf`: skips CRLF keep-alives (returning
    /// [`Frame::Ping`] for a double-CRLF ping), finds the end of the header block, reads its
    /// Content-Length (also the compact `l:`), and waits for the whole body.
    ///
    /// `Ok(None)` means more bytes are needed. Bytes after the frame stay in `buf` for the next
    /// call. After an error the transport must close the connection.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FramingError> {
        if self.pending_total.is_none() && self.scanned == 0 {
            // Between messages: keep-alives (RFC 5626 §3.5.1) and stray line breaks before a
            // start line (RFC 3261 §7.5).
            loop {
                match &buf[..] {
                    [b'\r', b'\n', b'\r', b'\n', ..] => {
                        buf.advance(4);
                        return Ok(Some(Frame::Ping));
                    }
                    // Could still become a ping.
                    [b'\r'] | [b'\r', b'\n'] | [b'\r', b'\n', b'\r'] => return Ok(None),
                    [b'\r', b'\n', ..] => buf.advance(2),
                    [b'\n', ..] => buf.advance(1),
                    _ => break,
                }
            }
            if buf.is_empty() {
                return Ok(None);
            }
        }

        let total = match self.pending_total {
            Some(total) => total,
            None => {
                let Some(body_start) = self.find_header_end(buf) else {
                    if buf.len() > self.max_message {
                        return Err(self.too_large());
                    }
                    return Ok(None);
                };
                if body_start > self.max_message {
                    return Err(self.too_large());
                }
                let length = content_length(buf.get(..body_start).unwrap_or_default())?;
                let total = body_start
                    .checked_add(length)
                    .filter(|t| *t <= self.max_message)
                    .ok_or_else(|| self.too_large())?;
                self.pending_total = Some(total);
                total
            }
        };
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        self.scanned = 0;
        self.pending_total = None;
        Ok(Some(Frame::Message(buf.split_to(total).freeze())))
    }

    fn too_large(&mut self) -> FramingError {
        self.scanned = 0;
        self.pending_total = None;
        FramingError::TooLarge {
            limit: self.max_message,
        }
    }

    /// Where the body starts: just after the first empty line (CRLF CRLF, or bare-LF forms).
    fn find_header_end(&mut self, buf: &[u8]) -> Option<usize> {
        // Resume a little before where the last search stopped: the terminator may straddle
        // two reads.
        let from = self.scanned.saturating_sub(3);
        let mut i = from;
        while let Some(rel) = buf
            .get(i..)
            .and_then(|s| s.iter().position(|&b| b == b'\n'))
        {
            let nl = i + rel;
            match buf.get(nl + 1) {
                Some(b'\n') => return Some(nl + 2),
                Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some(nl + 3),
                // The buffer ends inside a possible terminator: wait for more bytes.
                None => break,
                Some(b'\r') if nl + 2 >= buf.len() => break,
                Some(_) => i = nl + 1,
            }
        }
        self.scanned = buf.len();
        None
    }
}

/// The Content-Length of a header block (start line included): the last line of it is the
/// empty line.
fn content_length(head: &[u8]) -> Result<usize, FramingError> {
    let mut found: Option<usize> = None;
    // Skip the start line; a Content-Length folded over lines is not supported (nobody does
    // that) and reads as malformed.
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = trim(line.get(..colon).unwrap_or_default());
        if !(name.eq_ignore_ascii_case(b"Content-Length") || name.eq_ignore_ascii_case(b"l")) {
            continue;
        }
        let value = trim(line.get(colon + 1..).unwrap_or_default());
        if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
            return Err(FramingError::BadContentLength);
        }
        let length = value
            .iter()
            .try_fold(0usize, |acc, d| {
                acc.checked_mul(10)?.checked_add(usize::from(d - b'0'))
            })
            .unwrap_or(usize::MAX);
        match found {
            Some(previous) if previous != length => return Err(FramingError::BadContentLength),
            _ => found = Some(length),
        }
    }
    found.ok_or(FramingError::MissingContentLength)
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |e| e + 1);
    s.get(start..end).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn message(body: &str) -> String {
        format!(
            "MESSAGE sip:bob@relay.test SIP/2.0\r\n\
Via: SIP/2.0/TCP 192.0.2.1;branch=z9hG4bK1\r\n\
Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    fn frames(decoder: &mut StreamDecoder, buf: &mut BytesMut) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(frame) = decoder.decode(buf).unwrap() {
            out.push(frame);
        }
        out
    }

    #[test]
    fn two_messages_in_one_read() {
        let (a, b) = (message("hello"), message("world!"));
        let mut buf = BytesMut::from(format!("{a}{b}").as_bytes());
        let mut d = StreamDecoder::default();
        let got = frames(&mut d, &mut buf);
        assert_eq!(
            got,
            vec![
                Frame::Message(Bytes::from(a)),
                Frame::Message(Bytes::from(b))
            ]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn one_message_split_over_many_reads() {
        let a = message("split body");
        let mut d = StreamDecoder::default();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in a.as_bytes() {
            buf.extend_from_slice(&[*byte]);
            got.extend(frames(&mut d, &mut buf));
        }
        assert_eq!(got, vec![Frame::Message(Bytes::from(a))]);
    }

    #[test]
    fn body_shorter_than_content_length_waits() {
        let a = message("0123456789");
        let cut = a.len() - 4;
        let mut d = StreamDecoder::default();
        let mut buf = BytesMut::from(&a.as_bytes()[..cut]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        assert_eq!(buf.len(), cut, "nothing consumed while incomplete");
        buf.extend_from_slice(&a.as_bytes()[cut..]);
        assert_eq!(d.decode(&mut buf), Ok(Some(Frame::Message(Bytes::from(a)))));
    }

    #[test]
    fn keepalives_are_skipped_and_pings_reported() {
        let a = message("x");
        let mut buf = BytesMut::from(format!("\r\n\r\n\r\n{a}\r\n").as_bytes());
        let mut d = StreamDecoder::default();
        assert_eq!(d.decode(&mut buf), Ok(Some(Frame::Ping)));
        assert_eq!(d.decode(&mut buf), Ok(Some(Frame::Message(Bytes::from(a)))));
        // A lone CRLF could be the start of a ping: wait.
        assert_eq!(d.decode(&mut buf), Ok(None));
        assert_eq!(&buf[..], b"\r\n");
        buf.extend_from_slice(b"\r\n");
        assert_eq!(d.decode(&mut buf), Ok(Some(Frame::Ping)));
        assert!(buf.is_empty());
    }

    #[test]
    fn compact_content_length_and_bare_lf() {
        let a = "OPTIONS sip:x SIP/2.0\nl : 3\n\nabcREST";
        let mut buf = BytesMut::from(a.as_bytes());
        let mut d = StreamDecoder::default();
        assert_eq!(
            d.decode(&mut buf),
            Ok(Some(Frame::Message(Bytes::from_static(
                b"OPTIONS sip:x SIP/2.0\nl : 3\n\nabc"
            ))))
        );
        assert_eq!(&buf[..], b"REST");
    }

    #[test]
    fn errors_close_the_stream() {
        let mut d = StreamDecoder::default();
        let mut buf = BytesMut::from(&b"OPTIONS sip:x SIP/2.0\r\nVia: a\r\n\r\n"[..]);
        assert_eq!(d.decode(&mut buf), Err(FramingError::MissingContentLength));
        let mut d = StreamDecoder::default();
        let mut buf = BytesMut::from(&b"OPTIONS sip:x SIP/2.0\r\nContent-Length: -9\r\n\r\n"[..]);
        assert_eq!(d.decode(&mut buf), Err(FramingError::BadContentLength));
        let mut d = StreamDecoder::default();
        let mut buf =
            BytesMut::from(&b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 1\r\nl: 2\r\n\r\nab"[..]);
        assert_eq!(d.decode(&mut buf), Err(FramingError::BadContentLength));
    }

    #[test]
    fn oversized_messages_are_refused_early() {
        let mut d = StreamDecoder::new(100);
        // Declared body beyond the limit: refused as soon as the header block is complete.
        let mut buf = BytesMut::from(&b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 1000\r\n\r\n"[..]);
        assert_eq!(
            d.decode(&mut buf),
            Err(FramingError::TooLarge { limit: 100 })
        );
        // A header block that never ends: refused once it passes the limit.
        let mut d = StreamDecoder::new(100);
        let mut buf = BytesMut::from(&b"OPTIONS sip:x SIP/2.0\r\n"[..]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&[b'a'; 100]);
        assert_eq!(
            d.decode(&mut buf),
            Err(FramingError::TooLarge { limit: 100 })
        );
        // Huge numbers do not overflow.
        let mut d = StreamDecoder::new(100);
        let mut buf = BytesMut::from(
            &b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 99999999999999999999999\r\n\r\n"[..],
        );
        assert_eq!(
            d.decode(&mut buf),
            Err(FramingError::TooLarge { limit: 100 })
        );
    }

    #[test]
    fn frames_parse_through_the_wire_layer() {
        let a = "MESSAGE sip:bob@relay.test SIP/2.0\r\n\
Via: SIP/2.0/TCP 192.0.2.1;branch=z9hG4bK1\r\n\
From: <sip:alice@relay.test>;tag=1\r\n\
To: <sip:bob@relay.test>\r\n\
Call-ID: x@y\r\n\
CSeq: 1 MESSAGE\r\n\
Content-Length: 5\r\n\r\nhello";
        let mut buf = BytesMut::from(format!("{a}{a}").as_bytes());
        let mut d = StreamDecoder::default();
        for _ in 0..2 {
            let Some(Frame::Message(frame)) = d.decode(&mut buf).unwrap() else {
                panic!("no frame");
            };
            let msg = crate::wire::parse(&frame).unwrap();
            assert_eq!(msg.body(), b"hello");
        }
    }
}
