//! The service request information (DESIGN.md, "Mapping to SIP"): a service name and its
//! parameters, written into the Request-URI (`sip:video@relay;quality=hd`), the
//! `P-Preferred-Service` header (RFC 6050) and `Refer-To`.

use std::fmt;

/// A requested service: `name[;param[=value]…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRequest {
    /// The service name, the user part of the Request-URI.
    pub name: String,
    /// The service parameters, in the order given.
    pub params: Vec<(String, Option<String>)>,
}

/// Why a service request could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError(pub String);

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ServiceError {}

/// Characters allowed in a service name and parameter names and values: RFC 3261's
/// `unreserved` set (less the marks that need care in a header), so that nothing has to be
/// escaped in a URI or a header.
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '!' | '~' | '*' | '\'' | '+')
}

fn check_token(what: &str, s: &str) -> Result<(), ServiceError> {
    if s.is_empty() {
        return Err(ServiceError(format!("empty {what}")));
    }
    if let Some(c) = s.chars().find(|c| !is_token_char(*c)) {
        return Err(ServiceError(format!(
            "{what} {s:?} contains {c:?} (allowed: letters, digits and - _ . ! ~ * ' +)"
        )));
    }
    Ok(())
}

impl ServiceRequest {
    /// Reads `name[;p=v…]` followed by further parameter arguments, each `;p=v`, `p=v` or
    /// several joined (`;a=1;b=2`), as given on the command line.
    pub fn parse_args(service: &str, extra: &[String]) -> Result<ServiceRequest, ServiceError> {
        let mut req = ServiceRequest::parse(service)?;
        for arg in extra {
            let arg = arg.trim().trim_start_matches(';');
            for part in arg.split(';').filter(|p| !p.trim().is_empty()) {
                req.params.push(parse_param(part)?);
            }
        }
        Ok(req)
    }

    /// Reads `name[;p=v…]`.
    pub fn parse(text: &str) -> Result<ServiceRequest, ServiceError> {
        let mut parts = text.trim().split(';');
        let name = parts.next().unwrap_or_default().trim().to_string();
        check_token("service name", &name)?;
        let params = parts
            .filter(|p| !p.trim().is_empty())
            .map(parse_param)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ServiceRequest { name, params })
    }

    /// `;p=v;q` as written after a URI or a header value.
    pub fn params_text(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.params {
            out.push(';');
            out.push_str(k);
            if let Some(v) = v {
                out.push('=');
                out.push_str(v);
            }
        }
        out
    }

    /// The Request-URI of the inquiry, `sip:<service>@<domain>[;params]`.
    pub fn uri(&self, domain: &str) -> String {
        format!("sip:{}@{}{}", self.name, domain, self.params_text())
    }

    /// The value of `P-Preferred-Service`: `<service>[;params]`.
    pub fn header_value(&self) -> String {
        format!("{}{}", self.name, self.params_text())
    }
}

fn parse_param(part: &str) -> Result<(String, Option<String>), ServiceError> {
    let part = part.trim();
    match part.split_once('=') {
        Some((k, v)) => {
            check_token("parameter name", k.trim())?;
            check_token("parameter value", v.trim())?;
            Ok((k.trim().to_string(), Some(v.trim().to_string())))
        }
        None => {
            check_token("parameter name", part)?;
            Ok((part.to_string(), None))
        }
    }
}

impl fmt::Display for ServiceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.header_value())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn parses_name_and_params_from_args() {
        let s = ServiceRequest::parse_args(
            "video;quality=hd",
            &[";lang=en".into(), "fast".into(), ";a=1;b=2".into()],
        )
        .unwrap();
        assert_eq!(s.name, "video");
        assert_eq!(
            s.uri("relay.test"),
            "sip:video@relay.test;quality=hd;lang=en;fast;a=1;b=2"
        );
        assert_eq!(s.header_value(), "video;quality=hd;lang=en;fast;a=1;b=2");
    }

    #[test]
    fn refuses_what_would_break_a_uri_or_header() {
        for bad in [
            "",
            "a b",
            "echo@x",
            "x;q=<1>",
            "x;=1",
            "e\r\nVia: x",
            "x;k=a,b",
        ] {
            assert!(ServiceRequest::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(ServiceRequest::parse_args("echo", &["k=v v".into()]).is_err());
    }
}
