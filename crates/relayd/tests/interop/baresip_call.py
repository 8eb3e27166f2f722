#!/usr/bin/env python3
"""baresip (Debian baresip-core) through the relay: register, call, hold, hang up.

Writes a config directory into the work directory (no stdio UI: it needs a TTY; the menu
module for commands; ctrl_tcp on a loopback port; audio from ausine, played to ALSA's null
device), starts `baresip -f DIR`, connects to ctrl_tcp (netstring-framed JSON), and only then
creates the account with `uanew`, so that REGISTER_OK is not fired before anyone listens.
Then `dial`, waits for CALL_ESTABLISHED, holds, `hangup`, waits for CALL_CLOSED, `quit`.
See common.py for the arguments and the events printed.
"""

import json
import os
import socket
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

args = common.parse_args(__doc__)
baresip = common.which("baresip")
if baresip is None:
    common.missing("baresip", "the Debian package baresip-core (apt-get install baresip-core)")

conf = os.path.join(args.workdir, "baresip")
os.makedirs(conf, exist_ok=True)
sip_port = common.free_port()
ctrl_port = common.free_port()
modules = "/usr/lib/baresip/modules"
with open(os.path.join(conf, "config"), "w") as f:
    f.write(f"""poll_method epoll
sip_listen {args.local_ip}:{sip_port}
net_interface {args.local_ip}
call_local_timeout 120
audio_player alsa,null
audio_source ausine,440
audio_alert alsa,null
ausrc_srate 48000
ausrc_channels 2
rtcp_mux no
module_path {modules}
module g711.so
module ausine.so
module alsa.so
module_app menu.so
module_app ctrl_tcp.so
ctrl_tcp_listen {args.local_ip}:{ctrl_port}
""")
for name in ("accounts", "contacts"):
    open(os.path.join(conf, name), "w").close()

out_path = os.path.join(args.workdir, "baresip.out")
out = open(out_path, "wb")
proc = common.spawn([baresip, "-f", conf, "-s", "-v"], stdin=open(os.devnull, "rb"),
                    stdout=out, stderr=out, cwd=args.workdir)


class Ctrl:
    """A ctrl_tcp connection: netstring frames of JSON, commands out, responses and events
    in."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.events = []
        self.token = 0

    def send(self, command, params=""):
        self.token += 1
        msg = json.dumps({"command": command, "params": params,
                          "token": str(self.token)}).encode()
        self.sock.sendall(str(len(msg)).encode() + b":" + msg + b",")
        common.log(f"baresip ctrl <- {command} {params}")

    def _frames(self):
        while True:
            colon = self.buf.find(b":")
            if colon < 0:
                return
            n = int(self.buf[:colon])
            if len(self.buf) < colon + 1 + n + 1:
                return
            body = self.buf[colon + 1:colon + 1 + n]
            self.buf = self.buf[colon + 2 + n:]
            msg = json.loads(body)
            common.log(f"baresip ctrl -> {msg}")
            self.events.append(msg)

    def wait(self, pred, timeout):
        """The first message (from now on, oldest first) that pred accepts, or None."""
        end = time.monotonic() + min(timeout, args.deadline.left())
        while True:
            for i, m in enumerate(self.events):
                if pred(m):
                    del self.events[: i + 1]
                    return m
            left = end - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                return None
            self.sock.settimeout(min(left, 0.2))
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                return None
            self.buf += data
            self._frames()


def event(*types):
    return lambda m: m.get("event") and m.get("type") in types


def run():
    sock = None

    def connect():
        nonlocal sock
        try:
            sock = socket.create_connection((args.local_ip, ctrl_port), timeout=1)
            return True
        except OSError:
            return proc.poll() is not None

    common.wait_until(connect, min(10, args.deadline.left()))
    if sock is None:
        return f"baresip's ctrl_tcp never listened (exit {proc.poll()})"
    ctrl = Ctrl(sock)

    aor = (f"<sip:{args.user}@{args.domain};transport=udp>;auth_user={args.user};"
           f"auth_pass={args.password};"
           f"outbound=\"sip:{args.relay_host}:{args.relay_port};transport=udp\";"
           f"regint=300;audio_codecs=PCMU,PCMA;mediaenc=;medianat=")
    ctrl.send("uanew", aor)
    m = ctrl.wait(event("REGISTER_OK", "REGISTER_FAIL"), 15)
    if m is None or m["type"] != "REGISTER_OK":
        return f"no registration: {m}"
    common.emit("registered", param=m.get("param"))

    ctrl.send("dial", f"sip:{args.service}@{args.domain}")
    m = ctrl.wait(event("CALL_ESTABLISHED", "CALL_CLOSED"), 20)
    if m is None or m["type"] != "CALL_ESTABLISHED":
        return f"the call was not established: {m}"
    common.emit("established", peer=m.get("peeruri"))

    # The hold: the call stays up this long on purpose; a CALL_CLOSED meanwhile fails.
    m = ctrl.wait(event("CALL_CLOSED"), args.hold)
    if m is not None:
        return f"the call ended during the hold: {m.get('param')}"
    ctrl.send("hangup")
    m = ctrl.wait(event("CALL_CLOSED"), 10)
    if m is None:
        return "no CALL_CLOSED after hangup"
    common.emit("closed", param=m.get("param"))
    ctrl.send("quit")
    common.wait_until(lambda: proc.poll() is not None, min(5, args.deadline.left()))
    return None


failure = run()
common.stop(proc, 2)
if failure:
    common.log(common.tail(out_path, 80))
common.finish(failure is None, failure or "")
