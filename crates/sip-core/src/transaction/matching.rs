//! Transaction keys (RFC 3261 §17.1.3, §17.2.3) and the dialog-level key that matches an
//! ACK for a 2xx to the INVITE server transaction retransmitting that 2xx (§13.3.1.4).
//!
//! The keys own the `String`s of the message's [`Summary`], which is read once per message:
//! building a key moves them, it does not copy them. Methods are keyed by their enum
//! discriminant (rsip's `Method` is not `Hash`).

use std::hash::{BuildHasherDefault, Hasher};
use std::mem::{discriminant, Discriminant};

use rsip::Method;

use crate::message::{Summary, BRANCH_COOKIE};

/// A method as a hashable key.
pub(super) type MethodKey = Discriminant<Method>;

/// The key of a method.
pub(super) fn method_key(method: Method) -> MethodKey {
    discriminant(&method)
}

/// §17.1.3: a response matches a client transaction by the branch of its top Via and the
/// method of its CSeq.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct ClientKey {
    pub branch: String,
    pub method: MethodKey,
}

impl ClientKey {
    /// The key of a message, consuming its summary's branch.
    pub fn new(summary: &mut Summary) -> ClientKey {
        ClientKey {
            branch: std::mem::take(&mut summary.branch),
            method: method_key(summary.cseq_method),
        }
    }
}

/// §17.2.3: a request matches a server transaction by the branch and sent-by of its top Via
/// and its method, an ACK matching the INVITE it acknowledges. A branch without the RFC 3261
/// magic cookie comes from an RFC 2543 peer and is not unique: the key then also carries the
/// Call-ID, the CSeq number and the From tag (a simplification of §17.2.3's RFC 2543 rule,
/// leaving out the Request-URI and the To tag, which an ACK for a non-2xx changes).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct ServerKey {
    pub branch: String,
    pub sent_by: String,
    pub method: MethodKey,
}

impl ServerKey {
    /// The key of a request, consuming its summary's branch and sent-by. `method` is the
    /// request method; an ACK is keyed as the INVITE it belongs to.
    pub fn new(summary: &mut Summary, method: Method) -> ServerKey {
        let method = match method {
            Method::Ack => Method::Invite,
            m => m,
        };
        let branch = if summary.branch.starts_with(BRANCH_COOKIE) {
            std::mem::take(&mut summary.branch)
        } else {
            format!(
                "{}\n{}\n{}\n{}",
                summary.branch,
                summary.call_id,
                summary.cseq,
                summary.from_tag.as_deref().unwrap_or_default()
            )
        };
        ServerKey {
            branch,
            sent_by: std::mem::take(&mut summary.sent_by),
            method: method_key(method),
        }
    }
}

/// §13.3.1.4 / §17.2.3 note: the ACK for a 2xx has a branch of its own; the UAS matches it
/// to the INVITE by Call-ID, CSeq number and From tag (the dialog it confirms).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct AckKey {
    pub call_id: String,
    pub cseq: u32,
    pub from_tag: String,
}

impl AckKey {
    /// The key of a request, consuming its summary's Call-ID and From tag.
    pub fn new(summary: &mut Summary) -> AckKey {
        AckKey {
            call_id: std::mem::take(&mut summary.call_id),
            cseq: summary.cseq,
            from_tag: summary.from_tag.take().unwrap_or_default(),
        }
    }
}

/// A hasher for our own sequential transaction ids (never chosen by a peer, so no need for
/// SipHash's flood resistance): Fibonacci hashing, one multiplication.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Builds [`IdHasher`]s.
pub(super) type IdHash = BuildHasherDefault<IdHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(branch: &str) -> Summary {
        Summary {
            branch: branch.into(),
            sent_by: "10.0.0.1:5060".into(),
            call_id: "c@h".into(),
            cseq: 4,
            cseq_method: Method::Invite,
            from_tag: Some("ft".into()),
            to_tag: None,
        }
    }

    #[test]
    fn ack_keys_as_invite() {
        let invite = ServerKey::new(&mut summary("z9hG4bK1"), Method::Invite);
        let ack = ServerKey::new(&mut summary("z9hG4bK1"), Method::Ack);
        let cancel = ServerKey::new(&mut summary("z9hG4bK1"), Method::Cancel);
        assert_eq!(invite, ack);
        assert_ne!(invite, cancel);
        let other = ServerKey::new(&mut summary("z9hG4bK2"), Method::Invite);
        assert_ne!(invite, other);
    }

    #[test]
    fn rfc2543_key_uses_dialog_fields() {
        let a = ServerKey::new(&mut summary(""), Method::Invite);
        let mut s = summary("");
        s.call_id = "other".into();
        let b = ServerKey::new(&mut s, Method::Invite);
        assert_ne!(a, b);
        assert_eq!(a, ServerKey::new(&mut summary(""), Method::Ack));
    }

    #[test]
    fn client_key_by_branch_and_method() {
        let mut s = summary("z9hG4bK1");
        let k = ClientKey::new(&mut s);
        assert_eq!(k.branch, "z9hG4bK1");
        assert!(s.branch.is_empty(), "moved, not copied");
        s.branch = "z9hG4bK1".into();
        s.cseq_method = Method::Cancel;
        assert_ne!(k, ClientKey::new(&mut s));
    }

    #[test]
    fn id_hasher_spreads_sequential_ids() {
        let h = |n: u64| {
            let mut hasher = IdHasher::default();
            hasher.write_u64(n);
            hasher.finish()
        };
        assert_ne!(h(1) >> 57, h(2) >> 57);
        assert_ne!(h(1) & 0xff, h(2) & 0xff);
    }
}
