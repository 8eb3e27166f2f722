//! Escaping text for HTML and SVG: every value from the network (a subscriber's name, a
//! Call-ID, a reason phrase) goes through [`escape`] before it is written into a page.

/// `text` with `&`, `<`, `>`, `"` and `'` written as character references, safe in an
/// element's text and in a quoted attribute value.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_characters_are_escaped() {
        assert_eq!(
            escape(r#"<script>alert("x&y")</script>'"#),
            "&lt;script&gt;alert(&quot;x&amp;y&quot;)&lt;/script&gt;&#39;"
        );
        assert_eq!(escape("plain@host"), "plain@host");
        assert_eq!(escape("a\u{0}b"), "a\u{FFFD}b");
    }
}
