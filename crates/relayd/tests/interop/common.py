"""Shared parts of the interop drivers: arguments, events, deadlines, child processes.

Every driver (one per client: baresip, linphone-daemon, pjsua2, sipsak, sipp) takes the same
arguments, registers USER with digest at the relay, calls sip:SERVICE@DOMAIN, holds the call
HOLD seconds once it is established, hangs up, and prints one JSON object per line on stdout:

    {"event": "registered"}            the client's own registration success event
    {"event": "established"}           the client's own "call established" event
    {"event": "closed"}                the call ended (after our hangup)
    {"result": "pass"}                 last line, exit status 0
    {"result": "fail", "reason": ...}  last line, exit status 1
    {"result": "missing", "reason": ...}  the client is not installed, exit status 3

Everything waits on a condition (an event, a process exit, a socket) bounded by the
driver's --timeout; a child process is killed by its own pid when the driver ends.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

EXIT_PASS, EXIT_FAIL, EXIT_MISSING = 0, 1, 3

_children = []


def parse_args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--relay", default="127.0.0.1:5060", help="relay HOST:PORT (UDP)")
    p.add_argument("--domain", default="relay.test", help="relay domain / digest realm")
    p.add_argument("--user", default="alice")
    p.add_argument("--password", default="alice-secret")
    p.add_argument("--service", default="echo")
    p.add_argument("--hold", type=float, default=2.0, help="seconds to hold the call")
    p.add_argument("--timeout", type=float, default=40.0, help="bound on the whole run")
    p.add_argument("--workdir", default=None, help="where config and logs go (default: temp)")
    p.add_argument("--local-ip", default="127.0.0.1")
    args = p.parse_args()
    host, _, port = args.relay.rpartition(":")
    args.relay_host, args.relay_port = host or "127.0.0.1", int(port)
    if args.workdir is None:
        args.workdir = tempfile.mkdtemp(prefix="interop-")
    os.makedirs(args.workdir, exist_ok=True)
    args.deadline = Deadline(args.timeout)
    _install_handlers()
    return args


def emit(event, **fields):
    fields = {"event": event, **fields}
    print(json.dumps(fields), flush=True)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def finish(ok, reason=""):
    cleanup()
    if ok:
        print(json.dumps({"result": "pass"}), flush=True)
        sys.exit(EXIT_PASS)
    print(json.dumps({"result": "fail", "reason": reason}), flush=True)
    sys.exit(EXIT_FAIL)


def missing(what, package):
    print(json.dumps({"result": "missing",
                      "reason": f"{what} not found: install {package}"}), flush=True)
    sys.exit(EXIT_MISSING)


def which(name):
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return max(0.0, self.end - time.monotonic())

    def expired(self):
        return self.left() <= 0.0


def wait_until(cond, timeout, step=0.02):
    """Polls cond() until it is true or timeout passes; its last value."""
    end = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() >= end:
            return v
        time.sleep(step)


def free_port():
    """A loopback port free for both UDP and TCP right now."""
    for _ in range(100):
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.bind(("127.0.0.1", 0))
        port = t.getsockname()[1]
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            u.bind(("127.0.0.1", port))
        except OSError:
            t.close()
            continue
        t.close()
        u.close()
        return port
    raise RuntimeError("no free port")


def _die_with_parent():
    # PR_SET_PDEATHSIG: the client gets SIGKILL if this driver is killed outright (a test's
    # guard SIGKILLs it on overrun), so that no client outlives its driver.
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def spawn(argv, **kw):
    """Starts a child process, remembered so that cleanup() kills it by its pid."""
    proc = subprocess.Popen(argv, preexec_fn=_die_with_parent, **kw)
    _children.append(proc)
    return proc


def stop(proc, grace=3.0):
    """Waits up to `grace` for proc to exit, then SIGKILLs it (its own pid) and reaps it."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cleanup():
    while _children:
        proc = _children.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _on_signal(signum, _frame):
    cleanup()
    sys.exit(128 + signum)


def _install_handlers():
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, _on_signal)


def tail(path, lines=40):
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
