//! Property tests of sip-core's URI and address parsers (`sip_core::uri`,
//! `sip_core::address`): generated SIP, SIPS and tel URIs, name-addrs and parameter lists
//! print and parse back to equal values with the generated parts; random bytes and strings
//! never panic, and whatever parses round-trips.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use proptest::prelude::*;
use sip_core::address::{parse_list, quote, Contacts, FromTo, NameAddr, ServiceId};
use sip_core::fields::ViaView;
use sip_core::uri::{Host, Scheme, Uri};

#[derive(Debug, Clone)]
enum GenHost {
    Domain(String),
    V4(std::net::Ipv4Addr),
    V6(std::net::Ipv6Addr),
}

impl GenHost {
    fn text(&self) -> String {
        match self {
            GenHost::Domain(d) => d.clone(),
            GenHost::V4(ip) => ip.to_string(),
            GenHost::V6(ip) => format!("[{ip}]"),
        }
    }
}

#[derive(Debug, Clone)]
struct GenSip {
    sips: bool,
    user: Option<(String, Option<String>)>,
    host: GenHost,
    port: Option<u16>,
    params: Vec<(String, Option<String>)>,
    headers: Vec<(String, String)>,
}

impl GenSip {
    fn text(&self) -> String {
        let mut out = String::from(if self.sips { "sips:" } else { "sip:" });
        if let Some((user, password)) = &self.user {
            out.push_str(user);
            if let Some(p) = password {
                out.push(':');
                out.push_str(p);
            }
            out.push('@');
        }
        out.push_str(&self.host.text());
        if let Some(p) = self.port {
            out.push_str(&format!(":{p}"));
        }
        for (n, v) in &self.params {
            out.push(';');
            out.push_str(n);
            if let Some(v) = v {
                out.push('=');
                out.push_str(v);
            }
        }
        for (i, (n, v)) in self.headers.iter().enumerate() {
            out.push(if i == 0 { '?' } else { '&' });
            out.push_str(n);
            out.push('=');
            out.push_str(v);
        }
        out
    }
}

fn escaped() -> impl Strategy<Value = String> {
    "[0-9A-Fa-f]{2}".prop_map(|h| format!("%{h}"))
}

/// Characters of a user part (unreserved / user-unreserved) with some escapes.
fn user() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => "[a-zA-Z0-9_.!~*'()&=+$,;?/-]",
            1 => escaped(),
        ],
        1..12,
    )
    .prop_map(|v| v.concat())
}

fn host() -> impl Strategy<Value = GenHost> {
    prop_oneof![
        "[a-z]([a-z0-9-]{0,6}[a-z0-9])?(\\.[a-z]([a-z0-9]{0,5})){0,3}".prop_map(GenHost::Domain),
        any::<[u8; 4]>().prop_map(|o| GenHost::V4(o.into())),
        any::<u128>().prop_map(|b| GenHost::V6(b.into())),
    ]
}

fn param_chars() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![4 => "[a-zA-Z0-9_.!~*'()\\[\\]/:&+$-]", 1 => escaped()],
        1..10,
    )
    .prop_map(|v| v.concat())
}

fn sip_uri() -> impl Strategy<Value = GenSip> {
    (
        any::<bool>(),
        prop::option::of((user(), prop::option::of("[a-zA-Z0-9&=+$,]{0,8}"))),
        host(),
        prop::option::of(any::<u16>()),
        prop::collection::vec((param_chars(), prop::option::of(param_chars())), 0..4),
        prop::collection::vec(
            (
                "[a-zA-Z0-9_.!~*'()/?:+$-]{1,8}",
                "[a-zA-Z0-9_.!~*'()/?:+$-]{0,8}",
            ),
            0..3,
        ),
    )
        .prop_map(|(sips, user, host, port, params, headers)| GenSip {
            sips,
            user,
            host,
            port,
            params,
            headers,
        })
}

/// A tel URI: its text and its number without separators.
fn tel_uri() -> impl Strategy<Value = (String, String)> {
    let params = prop::collection::vec(
        (
            "[a-zA-Z0-9-]{1,8}".prop_map(String::from),
            prop::option::of(param_chars()),
        ),
        0..3,
    );
    let digits = prop::collection::vec(
        (
            "[0-9]".prop_map(String::from),
            "[-.()]?".prop_map(String::from),
        ),
        1..15,
    );
    prop_oneof![
        (digits, params).prop_map(|(digits, params)| {
            let mut text = String::from("tel:+");
            let mut number = String::from("+");
            for (d, sep) in digits {
                text.push_str(&d);
                text.push_str(&sep);
                number.push_str(&d);
            }
            for (n, v) in params {
                text.push(';');
                text.push_str(&n);
                if let Some(v) = v {
                    text.push('=');
                    text.push_str(&v);
                }
            }
            (text, number)
        }),
        ("[0-9A-F*#]{1,10}", "[a-z]{1,8}\\.[a-z]{2,3}")
            .prop_map(|(n, ctx)| (format!("tel:{n};phone-context={ctx}"), n)),
    ]
}

/// A display name: `Some((as written, as read))`.
fn display_name() -> impl Strategy<Value = Option<(String, String)>> {
    prop_oneof![
        Just(None),
        "[ -~\u{e9}\u{4e2d}]{0,16}".prop_map(|n| Some((quote(&n), n))),
        "[a-zA-Z0-9.!%*_+`'~-]{1,6}( [a-zA-Z0-9.!%*_+`'~-]{1,6}){0,2}"
            .prop_map(|n| Some((n.clone(), n))),
    ]
}

/// Header parameters: `(name, Some((as written, as read)))`.
fn header_params() -> impl Strategy<Value = Vec<(String, Option<(String, String)>)>> {
    prop::collection::vec(
        (
            "[a-zA-Z0-9.!%*_+`'~-]{1,10}",
            prop_oneof![
                Just(None),
                "[a-zA-Z0-9.!%*_+`'~-]{1,10}".prop_map(|v| Some((v.clone(), v))),
                "[ -~]{0,16}".prop_map(|v| Some((quote(&v), v))),
            ],
        ),
        0..4,
    )
}

fn write_params(out: &mut String, params: &[(String, Option<(String, String)>)]) {
    for (n, v) in params {
        out.push(';');
        out.push_str(n);
        if let Some((written, _)) = v {
            out.push('=');
            out.push_str(written);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn sip_uris_round_trip(g in sip_uri()) {
        let text = g.text();
        let u = Uri::parse(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
        prop_assert_eq!(u.scheme(), if g.sips { Scheme::Sips } else { Scheme::Sip });
        prop_assert_eq!(u.user(), g.user.as_ref().map(|(u, _)| u.as_str()));
        prop_assert_eq!(
            u.password(),
            g.user.as_ref().and_then(|(_, p)| p.as_deref())
        );
        match (&g.host, u.host()) {
            (GenHost::Domain(d), Some(Host::Domain(h))) => prop_assert_eq!(d.as_str(), h),
            (GenHost::V4(a), Some(Host::V4(b))) => prop_assert_eq!(*a, b),
            (GenHost::V6(a), Some(Host::V6(b))) => prop_assert_eq!(*a, b),
            (want, got) => prop_assert!(false, "{want:?} read as {got:?}"),
        }
        prop_assert_eq!(u.port(), g.port);
        let params: Vec<(String, Option<String>)> = u
            .params()
            .map(|(n, v)| (n.to_string(), v.map(str::to_string)))
            .collect();
        prop_assert_eq!(&params, &g.params);
        let headers: Vec<(String, String)> = u
            .headers()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        prop_assert_eq!(&headers, &g.headers);
        let printed = u.to_string();
        prop_assert_eq!(&printed, &text);
        prop_assert_eq!(&Uri::parse(&printed).unwrap(), &u);
        // Through rsip and back, printed the same.
        let r = u.to_rsip();
        prop_assert_eq!(r.to_string(), text);
        prop_assert_eq!(Uri::from_rsip(&r).unwrap(), u);
    }

    #[test]
    fn tel_uris_round_trip((text, number) in tel_uri()) {
        let u = Uri::parse(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
        prop_assert_eq!(u.scheme(), Scheme::Tel);
        prop_assert_eq!(u.tel_number(), Some(number));
        prop_assert_eq!(Uri::parse(&u.to_string()).unwrap(), u.clone());
        prop_assert_eq!(u.to_rsip().to_string(), text);
    }

    #[test]
    fn name_addrs_round_trip(
        name in display_name(),
        g in sip_uri(),
        params in header_params(),
        spaces in any::<bool>(),
    ) {
        let uri = g.text();
        let mut text = String::new();
        if let Some((written, _)) = &name {
            text.push_str(written);
            text.push(' ');
        }
        text.push('<');
        text.push_str(&uri);
        text.push('>');
        if spaces && !params.is_empty() {
            text.push(' ');
        }
        write_params(&mut text, &params);
        let a = NameAddr::parse(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
        prop_assert_eq!(
            a.display_name().map(|n| n.into_owned()),
            name.as_ref().map(|(_, read)| read.clone())
        );
        prop_assert_eq!(a.uri().as_str(), uri.as_str());
        let got: Vec<(String, Option<String>)> = params
            .iter()
            .map(|(n, _)| (n.clone(), a.param(n).unwrap().map(|v| v.into_owned())))
            .collect();
        // The first of each name (ASCII case ignored) is what `param` finds.
        let want: Vec<(String, Option<String>)> = params
            .iter()
            .map(|(n, _)| {
                let first = params.iter().find(|(m, _)| m.eq_ignore_ascii_case(n)).unwrap();
                (n.clone(), first.1.as_ref().map(|(_, read)| read.clone()))
            })
            .collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(a.params().count(), params.len());
        prop_assert_eq!(NameAddr::parse(&a.to_string()).unwrap(), a.clone());
        // Built back from its parts, it reads the same.
        let mut rebuilt = NameAddr::new(a.display_name().as_deref(), a.uri());
        for (n, v) in &params {
            rebuilt = rebuilt
                .with_param(n, v.as_ref().map(|(_, read)| read.as_str()))
                .unwrap();
        }
        prop_assert_eq!(rebuilt.display_name(), a.display_name());
        prop_assert_eq!(rebuilt.uri(), a.uri());
        prop_assert_eq!(NameAddr::parse(&rebuilt.to_string()).unwrap(), rebuilt.clone());
        for (n, _) in &params {
            prop_assert_eq!(rebuilt.param(n), a.param(n));
        }
    }

    #[test]
    fn lists_round_trip(
        items in prop::collection::vec((display_name(), sip_uri(), header_params()), 1..5),
    ) {
        let texts: Vec<String> = items
            .iter()
            .map(|(name, g, params)| {
                let mut t = String::new();
                if let Some((written, _)) = name {
                    t.push_str(written);
                    t.push(' ');
                }
                t.push('<');
                t.push_str(&g.text());
                t.push('>');
                write_params(&mut t, params);
                t
            })
            .collect();
        let joined = texts.join(" , ");
        let list = parse_list(&joined).map_err(|e| TestCaseError::fail(format!("{joined}: {e}")))?;
        prop_assert_eq!(list.len(), texts.len());
        for (a, t) in list.iter().zip(&texts) {
            prop_assert_eq!(&a.to_string(), t);
        }
        match Contacts::parse(&joined).unwrap() {
            Contacts::List(l) => prop_assert_eq!(l.len(), texts.len()),
            Contacts::Wildcard => prop_assert!(false),
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let text = String::from_utf8_lossy(&bytes);
        exercise(&text);
    }

    #[test]
    fn sip_like_strings_never_panic(
        prefix in prop::sample::select(vec!["", "sip:", "sips:", "tel:", "<sip:", "\"", "tel:+", "urn:"]),
        body in "[<>\"\\\\;,:@\\[\\]a-f0-9 =%?&+.()*#\t-]{0,48}",
    ) {
        exercise(&format!("{prefix}{body}"));
    }
}

/// Runs every reader on `text`; whatever parses must print back to an equal value.
fn exercise(text: &str) {
    if let Ok(u) = Uri::parse(text) {
        assert_eq!(Uri::parse(&u.to_string()).as_ref(), Ok(&u));
        assert_eq!(u.to_rsip().to_string(), u.to_string());
        let _ = (
            u.user_decoded(),
            u.tel_number(),
            u.host_port_text(),
            u.for_request_line(),
        );
    }
    if let Ok(a) = NameAddr::parse(text) {
        assert_eq!(NameAddr::parse(&a.to_string()).as_ref(), Ok(&a));
        let _ = (
            a.display_name(),
            a.tag(),
            a.expires(),
            a.q(),
            a.params().count(),
        );
        let _ = a.without_param("tag").with_param("tag", Some("x"));
    }
    if let Ok(l) = parse_list(text) {
        assert!(!l.is_empty());
    }
    let _ = Contacts::parse(text);
    let _ = FromTo::parse(text);
    if let Ok(s) = ServiceId::parse(text) {
        let _ = (s.name(), s.params().count());
        assert_eq!(ServiceId::parse(&s.to_string()).as_ref(), Ok(&s));
    }
    if let Some(v) = ViaView::parse(text) {
        let _ = (v.sent_by(), v.received(), v.host_ip(), v.branch());
    }
    let _ = sip_core::fields::tag_of(text);
}
