//! The little HTTP/1.1 the admin listener speaks: one request per connection, read within
//! fixed bounds (head size, header count, body size, time), answered with a JSON body and
//! `Connection: close`. The parsing is sans-IO ([`parse_head`]); [`read_request`] reads a
//! request off a stream within [`Bounds`].

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What one request may take. A stranger gets no more memory or time than this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The request line and headers, in bytes.
    pub max_head: usize,
    /// Header lines.
    pub max_headers: usize,
    /// The body, in bytes (its `Content-Length`).
    pub max_body: usize,
    /// The whole request, from the connection's start.
    pub timeout: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_head: 8 * 1024,
            max_headers: 32,
            max_body: 64 * 1024,
            timeout: Duration::from_secs(5),
        }
    }
}

/// A request read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// The method (`GET`, `POST`…).
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query (after `?`, still percent-encoded); empty without one.
    pub query: String,
    /// The headers, names in lower case, values trimmed.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request was not read. Each maps to the status it is answered with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The request line or a header is not HTTP/1.x.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The head is longer than allowed, or has too many headers.
    #[error("request head too large")]
    HeadTooLarge,
    /// The body is longer than allowed.
    #[error("request body too large")]
    BodyTooLarge,
    /// The request did not arrive whole in time, or the peer closed first.
    #[error("request incomplete")]
    Incomplete,
}

impl HttpError {
    /// The status to answer with, if any is worth sending.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Malformed(_) => Some(400),
            HttpError::HeadTooLarge => Some(431),
            HttpError::BodyTooLarge => Some(413),
            HttpError::Incomplete => None,
        }
    }
}

/// The head of a request: method, path, headers, and the body length it announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The method.
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query (after `?`); empty without one.
    pub query: String,
    /// The headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The `Content-Length` (0 without one).
    pub content_length: usize,
}

/// Reads a request head (without its blank line) within `bounds`.
pub fn parse_head(head: &[u8], bounds: &Bounds) -> Result<Head, HttpError> {
    if head.len() > bounds.max_head {
        return Err(HttpError::HeadTooLarge);
    }
    let text = std::str::from_utf8(head).map_err(|_| HttpError::Malformed("not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed("request line"));
    };
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return Err(HttpError::Malformed("version"));
    }
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::Malformed("method"));
    }
    if !target.starts_with('/') {
        return Err(HttpError::Malformed("target"));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (path, query) = (path.to_owned(), query.to_owned());
    let mut headers = Vec::new();
    let mut content_length = None;
    for line in lines {
        if headers.len() == bounds.max_headers {
            return Err(HttpError::HeadTooLarge);
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed("header line"));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace()) {
            return Err(HttpError::Malformed("header name"));
        }
        let name = name.to_ascii_lowercase();
        let value = value.trim().to_owned();
        if name == "content-length" {
            let n: usize = value
                .parse()
                .map_err(|_| HttpError::Malformed("content-length"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(HttpError::Malformed("content-length"));
            }
            content_length = Some(n);
        }
        if name == "transfer-encoding" {
            return Err(HttpError::Malformed("transfer-encoding is not supported"));
        }
        headers.push((name, value));
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > bounds.max_body {
        return Err(HttpError::BodyTooLarge);
    }
    Ok(Head {
        method: method.to_owned(),
        path,
        query,
        headers,
        content_length,
    })
}

/// Reads one request from `stream` within `bounds`.
pub async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    bounds: &Bounds,
) -> Result<HttpRequest, HttpError> {
    match tokio::time::timeout(bounds.timeout, read_bounded(stream, bounds)).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::Incomplete),
    }
}

async fn read_bounded<S: AsyncRead + Unpin>(
    stream: &mut S,
    bounds: &Bounds,
) -> Result<HttpRequest, HttpError> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
        if buf.len() > bounds.max_head + 4 {
            return Err(HttpError::HeadTooLarge);
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| HttpError::Incomplete)?;
        if n == 0 {
            return Err(HttpError::Incomplete);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = parse_head(&buf[..end], bounds)?;
    let mut body = buf.split_off(end + 4);
    if body.len() > head.content_length {
        return Err(HttpError::Malformed("more bytes than content-length"));
    }
    while body.len() < head.content_length {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| HttpError::Incomplete)?;
        if n == 0 {
            return Err(HttpError::Incomplete);
        }
        body.extend_from_slice(&chunk[..n]);
        if body.len() > head.content_length {
            return Err(HttpError::Malformed("more bytes than content-length"));
        }
    }
    Ok(HttpRequest {
        method: head.method,
        path: head.path,
        query: head.query,
        headers: head.headers,
        body,
    })
}

/// A response: a status and a JSON body (or a page: see [`HttpResponse::page`]).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The body.
    pub body: serde_json::Value,
    /// A body other than JSON, which then replaces [`HttpResponse::body`]: its content type
    /// and text.
    pub page: Option<(&'static str, String)>,
}

impl HttpResponse {
    /// A response of `status` with `body`.
    pub fn json(status: u16, body: serde_json::Value) -> HttpResponse {
        HttpResponse {
            status,
            body,
            page: None,
        }
    }

    /// A response of `status` with a `content_type` body `text` (an HTML page, a ladder
    /// in plain text). It is not cached, names no referrer (a page's URL may carry the
    /// token) and may run no script.
    pub fn page(status: u16, content_type: &'static str, text: String) -> HttpResponse {
        HttpResponse {
            status,
            body: serde_json::Value::Null,
            page: Some((content_type, text)),
        }
    }

    /// An error response: `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> HttpResponse {
        HttpResponse::json(status, serde_json::json!({ "error": message.into() }))
    }

    /// The response as bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        if let Some((content_type, text)) = &self.page {
            return format!(
                "HTTP/1.1 {} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nReferrer-Policy: no-referrer\r\nContent-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; img-src data:\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n{text}",
                self.status,
                reason(self.status),
                text.len()
            )
            .into_bytes();
        }
        let body = self.body.to_string();
        let mut extra = String::new();
        if self.status == 401 {
            extra.push_str("WWW-Authenticate: Bearer realm=\"relayd\"\r\n");
        }
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
            self.status,
            reason(self.status),
            body.len()
        )
        .into_bytes()
    }
}

/// Writes `response` to `stream`.
pub async fn write_response<S: AsyncWrite + Unpin>(
    stream: &mut S,
    response: &HttpResponse,
) -> std::io::Result<()> {
    stream.write_all(&response.to_bytes()).await?;
    stream.shutdown().await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn a_request_head_is_read_with_lower_case_names_and_its_length() {
        let head = parse_head(
            b"POST /api/v1/reload?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization:  Bearer abc \r\nContent-Length: 2",
            &Bounds::default(),
        )
        .unwrap();
        assert_eq!(head.method, "POST");
        assert_eq!(head.path, "/api/v1/reload");
        assert_eq!(head.query, "x=1");
        assert_eq!(head.content_length, 2);
        assert_eq!(
            head.headers[1],
            ("authorization".to_string(), "Bearer abc".to_string())
        );
    }

    #[test]
    fn bad_or_oversized_heads_are_refused_with_their_status() {
        let b = Bounds::default();
        for bad in [
            &b"GET /"[..],
            b"GET / HTTP/2\r\n",
            b"get / HTTP/1.1",
            b"GET nowhere HTTP/1.1",
            b"GET / HTTP/1.1\r\nno colon",
            b"GET / HTTP/1.1\r\nContent-Length: -1",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked",
        ] {
            let e = parse_head(bad, &b).unwrap_err();
            assert_eq!(e.status(), Some(400), "{:?}", String::from_utf8_lossy(bad));
        }
        let many: String = (0..40).map(|i| format!("\r\nX-{i}: y")).collect();
        let e = parse_head(format!("GET / HTTP/1.1{many}").as_bytes(), &b).unwrap_err();
        assert_eq!(e, HttpError::HeadTooLarge);
        let e = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 70000", &b).unwrap_err();
        assert_eq!(e.status(), Some(413));
        let long = format!("GET /{} HTTP/1.1", "a".repeat(9000));
        assert_eq!(
            parse_head(long.as_bytes(), &b).unwrap_err(),
            HttpError::HeadTooLarge
        );
    }

    #[tokio::test]
    async fn a_request_is_read_whole_or_refused_within_its_bounds() {
        let mut wire: &[u8] = b"POST /x HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody";
        let req = read_request(&mut wire, &Bounds::default()).await.unwrap();
        assert_eq!(req.body, b"body");
        // A head that never ends is cut off at the bound, not buffered on.
        let endless = vec![b'a'; 100_000];
        let mut wire: &[u8] = &endless;
        assert_eq!(
            read_request(&mut wire, &Bounds::default()).await,
            Err(HttpError::HeadTooLarge)
        );
        // A body shorter than announced: the peer closed first.
        let mut wire: &[u8] = b"POST /x HTTP/1.1\r\nContent-Length: 9\r\n\r\nbody";
        assert_eq!(
            read_request(&mut wire, &Bounds::default()).await,
            Err(HttpError::Incomplete)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_request_is_dropped_at_the_timeout() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let got = read_request(&mut server, &Bounds::default()).await;
        assert_eq!(got, Err(HttpError::Incomplete));
        drop(client);
    }

    #[test]
    fn a_401_asks_for_a_bearer_token() {
        let text = String::from_utf8(HttpResponse::error(401, "no").to_bytes()).unwrap();
        assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        assert!(text.contains("WWW-Authenticate: Bearer"));
        assert!(text.ends_with("{\"error\":\"no\"}"));
    }
}
