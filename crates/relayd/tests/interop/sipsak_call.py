#!/usr/bin/env python3
"""sipsak (Debian sipsak) through the relay: register, call, hold, hang up.

sipsak has no "call any URI" mode (-I calls itself), so the requests are files (-f): a
REGISTER, an INVITE with an audio offer (sipsak answers the 401/407 itself with -a/-u, and
ACKs the 200), and, once the hold is over, a BYE built from the 200's To tag, Contact and
Record-Route. -u USER (else it sends username="USER@"), -S to send and receive on one local
port, -H so that its Via carries the loopback address. Each sipsak run is bounded and
killed by its pid if it overruns. See common.py for the arguments and the events printed.
"""

import os
import re
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

args = common.parse_args(__doc__)
sipsak = common.which("sipsak")
if sipsak is None:
    common.missing("sipsak", "the Debian package sipsak (apt-get install sipsak)")

port = common.free_port()
tag = f"sk{os.getpid()}"
call_id = f"{tag}-{int(time.time() * 1000)}@{args.local_ip}"
relay = f"{args.relay_host}:{args.relay_port}"


def request_file(name, text):
    path = os.path.join(args.workdir, name)
    with open(path, "w", newline="") as f:
        f.write(text.replace("\n", "\r\n"))
    return path


def shoot(name, path, target):
    """Runs sipsak on one request file; (exit status, its output)."""
    out_path = os.path.join(args.workdir, f"{name}.out")
    argv = [sipsak, "-f", path, "-s", target, "-l", str(port), "-S", "-H", args.local_ip,
            "-a", args.password, "-u", args.user, "-vv"]
    with open(out_path, "wb") as out:
        proc = common.spawn(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            cwd=args.workdir)
        try:
            rc = proc.wait(timeout=min(15, args.deadline.left()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    with open(out_path, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    common.log(f"sipsak {name}: exit {rc}")
    return rc, text


def final_ok(text):
    return re.search(r"^\s+SIP/2\.0 2\d\d .*\n\s+final received", text, re.M) is not None


def last_response(text, status="200"):
    """The headers of the last response with `status` that sipsak printed."""
    starts = [m.start() for m in re.finditer(rf"^SIP/2\.0 {status} ", text, re.M)]
    if not starts:
        return None
    block = text[starts[-1]:].replace("\r\n", "\n").split("\n\n", 1)[0]
    return block.splitlines()


def run():
    reg = request_file("register.sip", f"""REGISTER sip:{args.domain} SIP/2.0
From: <sip:{args.user}@{args.domain}>;tag={tag}r
To: <sip:{args.user}@{args.domain}>
Call-ID: {call_id}r
CSeq: 1 REGISTER
Contact: <sip:{args.user}@{args.local_ip}:{port}>
Expires: 300
Max-Forwards: 70
User-Agent: sipsak
Content-Length: 0

""")
    rc, text = shoot("register", reg, f"sip:{args.user}@{relay}")
    if rc != 0 or not final_ok(text):
        return f"REGISTER failed (sipsak exit {rc}): {common.tail(os.path.join(args.workdir, 'register.out'), 3)}"
    common.emit("registered")

    sdp = (f"v=0\no=sipsak 1 1 IN IP4 {args.local_ip}\ns=sipsak\nc=IN IP4 {args.local_ip}\n"
           f"t=0 0\nm=audio {common.free_port()} RTP/AVP 0\na=rtpmap:0 PCMU/8000\na=sendrecv\n")
    body_len = len(sdp.replace("\n", "\r\n"))
    inv = request_file("invite.sip", f"""INVITE sip:{args.service}@{args.domain} SIP/2.0
From: <sip:{args.user}@{args.domain}>;tag={tag}
To: <sip:{args.service}@{args.domain}>
Call-ID: {call_id}
CSeq: 1 INVITE
Contact: <sip:{args.user}@{args.local_ip}:{port}>
Max-Forwards: 70
User-Agent: sipsak
Content-Type: application/sdp
Content-Length: {body_len}

{sdp}""")
    rc, text = shoot("invite", inv, f"sip:{args.service}@{relay}")
    ok = last_response(text)
    if rc != 0 or not final_ok(text) or ok is None:
        return f"INVITE failed (sipsak exit {rc}): {common.tail(os.path.join(args.workdir, 'invite.out'), 3)}"
    headers = {}
    routes = []
    for line in ok[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name in ("record-route",):
            routes.extend(v.strip() for v in value.split(","))
        else:
            headers.setdefault(name, value.strip())
    to = headers.get("to") or headers.get("t")
    contact = re.search(r"<([^>]+)>", headers.get("contact") or headers.get("m") or "")
    cseq = int((headers.get("cseq") or "1").split()[0])
    if not to or ";tag=" not in to or contact is None:
        return f"the 200 to the INVITE lacks a To tag or a Contact: {ok}"
    common.emit("established")

    # The hold: the call stays up this long on purpose (sipsak has exited: nothing to watch).
    time.sleep(args.hold)

    route_lines = "".join(f"Route: {r}\n" for r in reversed(routes))
    bye = request_file("bye.sip", f"""BYE {contact.group(1)} SIP/2.0
{route_lines}From: <sip:{args.user}@{args.domain}>;tag={tag}
To: {to}
Call-ID: {call_id}
CSeq: {cseq + 1} BYE
Max-Forwards: 70
User-Agent: sipsak
Content-Length: 0

""")
    target = re.search(r"<([^>;]+)", routes[0]).group(1) if routes else contact.group(1)
    rc, text = shoot("bye", bye, target)
    if rc != 0 or not final_ok(text):
        return f"BYE failed (sipsak exit {rc}): {common.tail(os.path.join(args.workdir, 'bye.out'), 3)}"
    common.emit("closed")
    return None


failure = run()
common.finish(failure is None, failure or "")
