//! The admin API's authorization: `Authorization: Bearer <token>` (RFC 6750 §2.1) against the
//! configured token, compared in constant time, so that the time of a refusal tells nothing
//! of how much of a guess was right.

use crate::admin_config::AdminToken;

/// Whether the value of an `Authorization` header carries `token`.
pub fn authorized(header: Option<&str>, token: &AdminToken) -> bool {
    let Some(value) = header else {
        return false;
    };
    let value = value.trim();
    let Some((scheme, presented)) = value.split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && constant_time_eq(presented.trim().as_bytes(), token.expose().as_bytes())
}

/// Whether `a` and `b` are equal, taking the same time whatever byte differs. (The length
/// of the configured token is no secret worth the trouble: a token is at least 16
/// characters.)
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the optimiser from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_bearer_token_is_authorized() {
        let token = AdminToken::new("0123456789abcdef");
        assert!(authorized(Some("Bearer 0123456789abcdef"), &token));
        assert!(authorized(Some("bearer  0123456789abcdef "), &token));
        assert!(!authorized(None, &token));
        assert!(!authorized(Some(""), &token));
        assert!(!authorized(Some("Bearer"), &token));
        assert!(!authorized(Some("Bearer 0123456789abcdeF"), &token));
        assert!(!authorized(Some("Bearer 0123456789abcde"), &token));
        assert!(!authorized(Some("Bearer 0123456789abcdef0"), &token));
        assert!(!authorized(Some("Basic 0123456789abcdef"), &token));
    }

    #[test]
    fn equal_only_when_every_byte_is() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
