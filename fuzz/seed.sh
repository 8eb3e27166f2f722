#!/usr/bin/env bash
# Writes the seed corpus of every fuzz target into fuzz/corpus/<target>/seed-* from the
# messages the tests already hold: the RFC 4475 torture messages
# (crates/sip-core/tests/rfc4475/) and the messages sipp sends in the scenarios of the system
# and interoperability tests (crates/*/tests/scenarios/*.xml, crates/relayd/tests/interop/*.xml,
# with sipp's [keywords] filled in with fixed values and Content-Length computed).
#
#   wire         each message
#   framing      each scenario's messages as one stream, with CRLF keep-alives between; each
#                torture message alone
#   sdp          each SDP body
#   digest       each Authorization / WWW-Authenticate / Proxy-* value, then a user, a
#                password, a Request-URI and a method on the next lines
#   uri          each message's Request-URI and address header values, one a line
#   transaction  each scenario as a script (fuzz/src/lib.rs, module transaction): its
#                requests delivered and answered, its responses as the peer's replies to a
#                request of ours, with time passing
#
# Old seed-* files are replaced; inputs the fuzzer added are left alone. Needs python3.
# Usage: fuzz/seed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 - "$@" <<'PY'
import glob, os, re, sys

ROOT = os.getcwd()
CORPUS = os.path.join(ROOT, "fuzz", "corpus")
TARGETS = ["wire", "framing", "sdp", "digest", "uri", "transaction"]

# sipp's keywords, filled in once for all.
KEYWORDS = {
    "local_ip": "192.0.2.1", "local_port": "5060", "remote_ip": "192.0.2.9",
    "remote_port": "5060", "transport": "UDP", "call_number": "1", "pid": "4242",
    "call_id": "1-4242@192.0.2.1", "user": "alice", "field0": "alice", "field1": "secret",
    "service": "echo", "media_ip_type": "4", "media_ip": "192.0.2.1",
    "local_ip_type": "4", "next_url": "sip:bob@192.0.2.9:5060", "routes": "",
    "authentication": 'Authorization: Digest username="alice", realm="relay.test", '
    'nonce="66f1b2a4c3d2e1f0a1b2c3d4e5f60718", uri="sip:192.0.2.9:5060", '
    'response="6629fae49393a05397450978507c4ef1", algorithm=MD5, qop=auth, '
    'nc=00000001, cnonce="0a4f113b"',
    "target": "sip:bob@192.0.2.9", "unknown": "nobody", "domain": "relay.test",
    "unsubscribed": "carol", "refused": "dave", "token": "c2Vzc2lvbi10b2tlbg",
    "token2": "b3RoZXItdG9rZW4", "data_port": "6000", "contact_port": "5062",
    "peer_tag_param": ";tag=peer1", "media_port": "9", "event": "refer",
    "amount": "12", "reason": "done", "body": "",
}

# The headers of the request a UAS scenario answers ([last_Via:] …).
LAST = {
    "Via": "Via: SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bK-peer;received=192.0.2.9",
    "From": "From: <sip:alice@relay.test>;tag=peer-from",
    "To": "To: <sip:echo@relay.test>",
    "Call-ID": "Call-ID: 9-4242@192.0.2.9",
    "CSeq": "CSeq: 1 INVITE",
    "Contact": "Contact: <sip:relay@192.0.2.9:5060>",
}
LAST_REQUEST = ("INVITE sip:echo@192.0.2.9:5060 SIP/2.0\r\n" +
                "\r\n".join(LAST[h] for h in ("Via", "From", "To", "Call-ID", "CSeq")) +
                "\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()
# Scenario variables ([$name]) that are not an address.
VARIABLES = {"cseq": "1", "inv_cseq": "1 INVITE", "invite_cseq": "1 INVITE",
             "inv_via": "SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bK-peer"}


def fill(text):
    def one(m):
        key = m.group(1)
        if key in KEYWORDS:
            return KEYWORDS[key]
        if key.startswith("$"):
            return VARIABLES.get(key[1:], "<sip:bob@192.0.2.9:5060>")
        return m.group(0)
    text = re.sub(r"\[branch[^\]]*\]", lambda m: "z9hG4bK-seed-%d" % fill.n, text)
    fill.n += 1
    for name, line in LAST.items():
        text = text.replace("[last_%s:]" % name, line)
    return re.sub(r"\[([A-Za-z_$][A-Za-z0-9_.$]*)\]", one, text)
fill.n = 0


def sipp_messages(path):
    """The messages a scenario sends, as bytes."""
    xml = open(path, encoding="latin-1").read()
    out = []
    for block in re.findall(r"<send[^>]*>\s*<!\[CDATA\[(.*?)\]\]>", xml, re.S):
        lines = block.split("\n")
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()
        lines = [l.strip() for l in lines]
        if not lines:
            continue
        try:
            blank = lines.index("")
        except ValueError:
            blank = len(lines)
        head = [fill(l) for l in lines[:blank] if l != "[routes]"]
        head = [l for l in head if l.strip()]
        body = "".join(fill(l) + "\r\n" for l in lines[blank + 1:])
        head = [l.replace("[len]", str(len(body.encode()))) for l in head]
        if not any(l.lower().startswith(("content-length:", "l:")) for l in head):
            head.append("Content-Length: %d" % len(body.encode()))
        out.append(("\r\n".join(head) + "\r\n\r\n" + body).encode())
    return out


def torture():
    """The RFC 4475 messages, by name."""
    files = sorted(glob.glob(os.path.join(ROOT, "crates/sip-core/tests/rfc4475/*/*.dat")))
    return [(os.path.basename(os.path.dirname(f)) + "-" + os.path.basename(f)[:-4],
             open(f, "rb").read()) for f in files]


def split(msg):
    end = msg.find(b"\r\n\r\n")
    if end < 0:
        return msg, b""
    return msg[:end], msg[end + 4:]


def header_values(msg, names):
    head, _ = split(msg)
    out = []
    for line in head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ").split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() in names:
            out.append(value.strip())
    return out


ADDRESS_HEADERS = {b"from", b"f", b"to", b"t", b"contact", b"m", b"route", b"record-route",
                   b"refer-to", b"r", b"p-asserted-identity", b"p-preferred-identity",
                   b"referred-by", b"b", b"reply-to", b"p-asserted-service",
                   b"p-preferred-service"}
AUTH_HEADERS = {b"authorization", b"www-authenticate", b"proxy-authorization",
                b"proxy-authenticate"}
# What a DigestServer sends and a client answers, for the digest target.
DIGEST_EXTRA = [
    b'Digest realm="relay.test", nonce="0000000065536f00a1b2c3d4e5f60718293a4b5c6d7e8f90", '
    b'algorithm=SHA-256, qop="auth"',
    b'Digest realm="relay.test", nonce="0000000065536f00a1b2c3d4e5f60718293a4b5c6d7e8f90", '
    b'algorithm=MD5, qop="auth", stale=true, opaque="xyz"',
    b'Digest realm="biloxi.com", qop="auth,auth-int", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", '
    b'opaque="5ccc069c403ebaf9f0171e9517f40e41"',
    b'Digest username="bob", realm="biloxi.com", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", '
    b'uri="sip:bob@biloxi.com", qop=auth, nc=00000001, cnonce="0a4f113b", '
    b'response="6629fae49393a05397450978507c4ef1", opaque="5ccc069c403ebaf9f0171e9517f40e41"',
    b'Digest username="alice", realm="relay.test", nonce="abc", uri="sip:relay.test", '
    b'response="0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", '
    b'algorithm=SHA-256-sess, qop=auth, nc=0000000a, cnonce="c"',
]


def request_line_uri(msg):
    first = msg.split(b"\r\n", 1)[0].split(b" ")
    if len(first) == 3 and not first[0].startswith(b"SIP/"):
        return [first[1]]
    return []


def is_request(msg):
    return not msg.lstrip().startswith(b"SIP/")


def main():
    seeds = {t: {} for t in TARGETS}
    scenarios = sorted(glob.glob(os.path.join(ROOT, "crates/*/tests/scenarios/*.xml")) +
                       glob.glob(os.path.join(ROOT, "crates/*/tests/interop/*.xml")))
    streams = []
    for path in scenarios:
        crate = path.split(os.sep)[-4]
        name = crate + "-" + os.path.basename(path)[:-4]
        msgs = sipp_messages(path)
        if not msgs:
            continue
        for i, m in enumerate(msgs):
            seeds["wire"]["%s-%d" % (name, i)] = m
        streams.append((name, msgs))
        seeds["framing"][name] = b"\r\n\r\n".join(msgs) + b"\r\n"
        # The scenario as the peer of a transaction layer.
        script = []
        received = 0
        if not is_request(msgs[0]):
            # sipp answers: we are its UAC, with the request its [last_*:] headers echo.
            script.append(b"@send 1 udp\n" + LAST_REQUEST + b"\n")
        for m in msgs:
            if is_request(m):
                method = m.split(b" ", 1)[0]
                script.append(b"@in 0 udp\n" + m + b"\n")
                if method != b"ACK":
                    code = b"200" if method != b"INVITE" else b"180\n@respond %d 200" % received
                    script.append(b"@respond %d %s\n" % (received, code))
                    received += 1
                script.append(b"@wait 120\n")
            else:
                # A response from the peer, to the request of ours above (its Via and CSeq
                # are those of LAST_REQUEST).
                script.append(b"@in 1 udp\n" + m + b"\n@wait 50\n")
        script.append(b"@wait 40000\n@again 0\n@wait 200000\n")
        seeds["transaction"][name] = b"".join(script)
    # A client side: requests of ours, answered, lost, retransmitted.
    for name, msgs in streams[:12]:
        reqs = [m for m in msgs if is_request(m) and not m.startswith(b"ACK ")]
        if not reqs:
            continue
        script = [b"@send 1 udp\n" + r + b"\n" for r in reqs[:3]]
        script += [b"@wait 500\n@wait 1000\n@reply 0 100\n@reply 0 180\n@reply 0 486\n",
                   b"@wait 2000\n@reply 1 200\n@lost 1 udp\n@wait 64000\n"]
        seeds["transaction"]["client-" + name] = b"".join(script)

    for name, msg in torture():
        seeds["wire"]["rfc4475-" + name] = msg
        seeds["framing"]["rfc4475-" + name] = msg
        seeds["transaction"]["rfc4475-" + name] = (
            b"@in 0 udp\n" + msg + b"\n@wait 100\n@respond 0 486\n@ack 0\n@again 0\n"
            b"@wait 33000\n")

    all_msgs = list(seeds["wire"].items())
    for name, msg in all_msgs:
        head, body = split(msg)
        if body.lstrip().startswith(b"v="):
            seeds["sdp"][name] = body
        values = request_line_uri(msg) + header_values(msg, ADDRESS_HEADERS)
        if values:
            seeds["uri"][name] = b"\n".join(values)
        for i, v in enumerate(header_values(msg, AUTH_HEADERS)):
            uri = (request_line_uri(msg) or [b"sip:relay.test"])[0]
            method = msg.split(b" ", 1)[0] if is_request(msg) else b"REGISTER"
            seeds["digest"]["%s-%d" % (name, i)] = b"\n".join([v, b"alice", b"secret", uri, method])
    for i, v in enumerate(DIGEST_EXTRA):
        seeds["digest"]["made-%d" % i] = b"\n".join([v, b"alice", b"secret", b"sip:relay.test",
                                                     b"REGISTER"])
    seeds["transaction"]["timers"] = (
        b"@timers 1 1 1\n@deadlines 5 3\n" + seeds["transaction"].get(
            "relayd-uac_call", b"@wait 1\n"))

    for target in TARGETS:
        d = os.path.join(CORPUS, target)
        os.makedirs(d, exist_ok=True)
        for old in glob.glob(os.path.join(d, "seed-*")):
            os.remove(old)
        seen = set()
        for name, data in sorted(seeds[target].items()):
            if data in seen:
                del seeds[target][name]
                continue
            seen.add(data)
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
            with open(os.path.join(d, "seed-" + safe), "wb") as f:
                f.write(data)
        print("%-12s %4d seeds" % (target, len(seeds[target])))


main()
PY
