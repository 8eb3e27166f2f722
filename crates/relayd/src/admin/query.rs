//! Reading a request's query (`?after=12&limit=100`) and percent-encoded path segments
//! (RFC 3986 §2.1).

/// The value of the first parameter called `name` in `query`, percent-decoded; `None`
/// when it is absent or not UTF-8 once decoded.
pub fn param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(n, _)| *n == name)
        .and_then(|(_, value)| decode(value))
}

/// `text` with its `%XX` escapes (and `+`, in a query a space) decoded; `None` when an
/// escape is malformed or the result is not UTF-8.
pub fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `text` percent-encoded for a path segment or a query value: every byte but the
/// unreserved ones (RFC 3986 §2.3) escaped.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_found_and_decoded() {
        assert_eq!(
            param("a=1&token=x%2By+z", "token").as_deref(),
            Some("x+y z")
        );
        assert_eq!(param("a=1", "token"), None);
        assert_eq!(param("follow", "follow").as_deref(), Some(""));
        assert_eq!(decode("%zz"), None);
        assert_eq!(decode("%4"), None);
        assert_eq!(decode("%FF"), None);
    }

    #[test]
    fn encoding_round_trips() {
        let id = "a/b?c d@h%1<\"x\">";
        assert_eq!(decode(&encode(id)).as_deref(), Some(id));
        assert!(!encode(id).contains(['/', '?', ' ', '@']));
    }
}
