#!/usr/bin/env python3
"""linphone-daemon (Debian linphone-cli) through the relay: register, call, hold, hang up.

Gives the daemon a HOME of its own in the work directory (it needs a writable
$HOME/.local/share/linphone, else it opens no SIP socket: "No listening point matching"), an
rc file binding SIP and RTP to --local-ip (else the SDP carries the default route's
address), and speaks to it on stdin/stdout: `register`, `register-status` until
LinphoneRegistrationOk, `call`, events LinphoneCall*, `terminate`, `quit`. "Could not find a
suitable soundcard" is harmless. See common.py for the arguments and the events printed.
"""

import os
import queue
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

args = common.parse_args(__doc__)
daemon = common.which("linphone-daemon")
if daemon is None:
    common.missing("linphone-daemon", "the Debian package linphone-cli (apt-get install linphone-cli)")

home = os.path.join(args.workdir, "home")
os.makedirs(os.path.join(home, ".local", "share", "linphone"), exist_ok=True)
os.makedirs(os.path.join(home, ".config"), exist_ok=True)
rc = os.path.join(args.workdir, "linphonerc")
sip_port = common.free_port()
rtp_port = common.free_port()
with open(rc, "w") as f:
    f.write(f"""[sip]
sip_port={sip_port}
sip_tcp_port=-1
sip_tls_port=-1
bind_address={args.local_ip}
use_ipv6=0
register_only_when_network_is_up=0
auto_net_state_mon=0
default_proxy=0
[proxy_0]
reg_identity=sip:{args.user}@{args.domain}
reg_proxy=<sip:{args.relay_host}:{args.relay_port};transport=udp>
reg_route=<sip:{args.relay_host}:{args.relay_port};transport=udp;lr>
reg_expires=300
reg_sendregister=1
realm={args.domain}
[auth_info_0]
username={args.user}
userid={args.user}
passwd={args.password}
realm={args.domain}
domain={args.domain}
[rtp]
audio_rtp_port={rtp_port}
video_rtp_port=-1
bind_address={args.local_ip}
[net]
firewall_policy=0
[sound]
echocancellation=0
[video]
capture=0
display=0
automatically_initiate=0
automatically_accept=0
""")

log_path = os.path.join(args.workdir, "linphone.log")
env = dict(os.environ, HOME=home, XDG_CONFIG_HOME=os.path.join(home, ".config"),
           XDG_DATA_HOME=os.path.join(home, ".local", "share"))
proc = common.spawn([daemon, "--config", rc, "--log", log_path, "--disable-stats-events"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    cwd=args.workdir, env=env)
lines = queue.Queue()
transcript = open(os.path.join(args.workdir, "linphone.out"), "w")


def reader():
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        transcript.write(line + "\n")
        transcript.flush()
        lines.put(line)
    lines.put(None)


threading.Thread(target=reader, daemon=True).start()


def send(cmd):
    common.log(f"linphone <- {cmd}")
    proc.stdin.write((cmd + "\n").encode())
    proc.stdin.flush()


def wait_line(pred, timeout):
    """The first output line (from now on) that pred accepts, or None at timeout / exit."""
    end = time.monotonic() + min(timeout, args.deadline.left())
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return None
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            return None
        if line is None:
            return None
        if line.strip():
            common.log(f"linphone -> {line}")
        if pred(line):
            return line


def has(*needles):
    return lambda line: any(n in line for n in needles)


def run():
    # The account is [proxy_0] of the rc file (with a route: a `register` command gives
    # none, and calls to sip:SERVICE@DOMAIN then go to DOMAIN by DNS); the daemon lists it
    # as registration 1.
    state = None
    end = time.monotonic() + min(15, args.deadline.left())
    while time.monotonic() < end:
        send("register-status 1")
        line = wait_line(has("State:", "Reason:"), 2)
        if line and "LinphoneRegistrationOk" in line:
            state = "ok"
            break
        if line and "LinphoneRegistrationFailed" in line:
            return f"registration failed: {line.strip()}"
        wait_line(lambda _l: False, 0.2)
    if state != "ok":
        return "never registered"
    common.emit("registered")

    send(f"call sip:{args.service}@{args.domain}")
    line = wait_line(has("LinphoneCallConnected", "LinphoneCallStreamsRunning",
                         "LinphoneCallError", "LinphoneCallEnd", "Status: Error"), 20)
    if line is None or "Error" in line or "End" in line:
        return f"the call was not established: {line}"
    common.emit("established", state=line.split(":", 1)[-1].strip())

    # The hold: the call stays up this long on purpose; an end meanwhile fails.
    line = wait_line(has("LinphoneCallEnd", "LinphoneCallError"), args.hold)
    if line is not None:
        return f"the call ended during the hold: {line}"
    send("terminate")
    line = wait_line(has("LinphoneCallEnd", "LinphoneCallReleased"), 10)
    if line is None:
        return "no LinphoneCallEnd after terminate"
    common.emit("closed")
    send("quit")
    common.wait_until(lambda: proc.poll() is not None, min(5, args.deadline.left()))
    return None


try:
    failure = run()
except (BrokenPipeError, OSError) as e:
    failure = f"linphone-daemon went away: {e}"
common.stop(proc, 2)
if failure:
    common.log(common.tail(log_path, 60))
common.finish(failure is None, failure or "")
