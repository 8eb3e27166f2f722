//! Registration with the relay (RFC 3261 §10): `REGISTER sip:<domain>` for
//! `sip:<user>@<domain>` with our Contact, digest-answered (401), refreshed before it
//! expires, removed with `Expires: 0`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use anyhow::Context as _;
use rsip::headers::UntypedHeader as _;
use rsip::{Header, Response};
use sip_core::address::{header_values, Contacts};
use sip_core::message;
use sip_core::uri::{Host, Uri};

use crate::events::{Event, Events};
use crate::failure::Failure;
use crate::headers;
use crate::ua::Ua;

/// One registration binding, kept across refreshes (same Call-ID, growing CSeq, §10.2.4).
pub struct Registration {
    ua: Ua,
    call_id: String,
    from_tag: String,
    cseq: u32,
    expires: u32,
    events: Events,
}

impl Registration {
    /// A registration asking for `expires` seconds.
    pub fn new(ua: Ua, expires: u32, events: Events) -> Registration {
        Registration {
            call_id: message::new_call_id(&ua.local_ip().to_string()),
            from_tag: message::new_tag(),
            cseq: 0,
            expires,
            ua,
            events,
        }
    }

    async fn send(&mut self, expires: u32) -> anyhow::Result<Response> {
        // sip-core's parser: the domain may be an IPv6 reference (`[::1]`).
        let uri = Uri::parse(&format!("sip:{}", self.ua.account().domain))
            .context("the domain does not make a REGISTER Request-URI")?;
        let aor = format!("<{}>", self.ua.account().aor());
        let relay = self.ua.relay();
        let ua = self.ua.clone();
        let call_id = self.call_id.clone();
        let from_tag = self.from_tag.clone();
        let cseq = &mut self.cseq;
        let (_, resp) = ua
            .transact(relay, || {
                *cseq += 1;
                Ok(ua.request(
                    rsip::Method::Register,
                    &uri,
                    &aor,
                    &call_id,
                    &from_tag,
                    *cseq,
                    vec![
                        Header::Expires(rsip::headers::Expires::new(expires.to_string())),
                        headers::allow(),
                    ],
                    Vec::new(),
                ))
            })
            .await?;
        Ok(resp)
    }

    /// Registers (or refreshes); returns the lifetime granted. A 423 (Interval Too Brief)
    /// is retried once with the relay's Min-Expires.
    pub async fn register(&mut self) -> anyhow::Result<u32> {
        let mut resp = self.send(self.expires).await?;
        if resp.status_code.code() == 423 {
            if let Some(min) = headers::first(&resp.headers, "Min-Expires")
                .and_then(|v| v.trim().parse::<u32>().ok())
            {
                self.expires = min;
                resp = self.send(self.expires).await?;
            }
        }
        let code = resp.status_code.code();
        if !(200..300).contains(&code) {
            let (_, reason) = headers::status(&resp);
            return Err(Failure::from_status("REGISTER", code, &reason).into());
        }
        let granted = granted_expires(&resp, self.ua.contact()).unwrap_or(self.expires);
        self.events.emit(Event::Registered {
            aor: self.ua.account().aor(),
            contact: self.ua.contact().to_string(),
            expires: granted,
            status: code,
        });
        Ok(granted)
    }

    /// Removes the binding (`Expires: 0`).
    pub async fn unregister(&mut self) -> anyhow::Result<()> {
        let resp = self.send(0).await?;
        let code = resp.status_code.code();
        if (200..300).contains(&code) {
            self.events.emit(Event::Unregistered { status: code });
            Ok(())
        } else {
            let (_, reason) = headers::status(&resp);
            Err(Failure::from_status("REGISTER (unregister)", code, &reason).into())
        }
    }
}

/// Refreshes the binding before it expires, for ever; returns only on a failure. The lock
/// is held only while a REGISTER is under way, so the owner can unregister at any time.
pub async fn keep_refreshed(reg: Arc<Mutex<Registration>>, mut granted: u32) -> anyhow::Error {
    loop {
        tokio::time::sleep(refresh_after(granted)).await;
        match reg.lock().await.register().await {
            Ok(g) => granted = g,
            Err(e) => return e,
        }
    }
}

/// When to refresh a binding granted for `expires` seconds: halfway, at least 1 s.
pub fn refresh_after(expires: u32) -> Duration {
    Duration::from_secs(u64::from(expires / 2).max(1))
}

/// The lifetime the registrar granted our Contact (§10.2.4): its `expires` parameter in the
/// 200's Contact list (read by sip-core's address parser: IPv6 hosts, quoted parameters and
/// comma-joined lists included), else the Expires header.
pub fn granted_expires(resp: &Response, our_contact: &Uri) -> Option<u32> {
    let from_contact = header_values(&resp.headers, "Contact")
        .filter_map(|v| match Contacts::parse(v) {
            Ok(Contacts::List(list)) => Some(list),
            _ => None,
        })
        .flatten()
        .find(|c| same_binding(c.uri(), our_contact))
        .and_then(|c| c.expires());
    from_contact.or_else(|| header_values(&resp.headers, "Expires").find_map(|v| v.parse().ok()))
}

/// Whether two SIP URIs name the same binding: user, host (a domain without regard to case,
/// an IP address by value, so `[::1]` and `[0:0::1]` are one) and port.
fn same_binding(a: &Uri, b: &Uri) -> bool {
    let same_host = match (a.host(), b.host()) {
        (Some(Host::Domain(x)), Some(Host::Domain(y))) => x.eq_ignore_ascii_case(y),
        (Some(x), Some(y)) => x == y,
        _ => false,
    };
    same_host && a.port() == b.port() && a.user() == b.user()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn resp(extra: &str) -> Response {
        let text = format!(
            "SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKx\r\nFrom: <sip:a@r>;tag=1\r\nTo: <sip:a@r>;tag=2\r\nCall-ID: c\r\nCSeq: 2 REGISTER\r\n{extra}Content-Length: 0\r\n\r\n"
        );
        match rsip::SipMessage::try_from(text.as_str()).unwrap() {
            rsip::SipMessage::Response(r) => r,
            _ => unreachable!(),
        }
    }

    #[test]
    fn granted_expiry_from_our_contact_then_header() {
        let ours = Uri::parse("sip:a@127.0.0.1:5070").unwrap();
        let r = resp("Contact: <sip:b@10.0.0.9:5060>;expires=99\r\nContact: <sip:a@127.0.0.1:5070>;expires=120\r\nExpires: 3600\r\n");
        assert_eq!(granted_expires(&r, &ours), Some(120));
        let r = resp("Expires: 300\r\n");
        assert_eq!(granted_expires(&r, &ours), Some(300));
        assert_eq!(granted_expires(&resp(""), &ours), None);
        // Another port of ours is another binding.
        let r = resp("Contact: <sip:a@127.0.0.1:50701>;expires=99\r\nExpires: 30\r\n");
        assert_eq!(granted_expires(&r, &ours), Some(30));
        assert_eq!(refresh_after(3600), Duration::from_secs(1800));
        assert_eq!(refresh_after(1), Duration::from_secs(1));
    }

    #[test]
    fn granted_expiry_of_an_ipv6_contact() {
        let ours = Uri::parse("sip:alice@[::1]:5070").unwrap();
        let r = resp(
            "Contact: <sip:alice@[::1]:5071>;expires=7, <sip:alice@[0:0::1]:5070>;expires=60\r\n\
             Expires: 3600\r\n",
        );
        assert_eq!(granted_expires(&r, &ours), Some(60));
        let r = resp("Contact: <sip:alice@127.0.0.1:5070>;expires=9\r\nExpires: 20\r\n");
        assert_eq!(granted_expires(&r, &ours), Some(20));
    }
}
