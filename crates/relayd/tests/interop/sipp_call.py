#!/usr/bin/env python3
"""sipp (Debian sip-tester) as a softphone through the relay: sipp_uac.xml registers, calls
with an audio offer, holds the call for the -d pause, hangs up; its <log> actions are the
events. sipp answers one digest challenge per request ([authentication], MD5, uri=
sip:HOST:PORT). See common.py for the arguments and the events printed.
"""

import os
import subprocess
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

args = common.parse_args(__doc__)
sipp = common.which("sipp")
if sipp is None:
    common.missing("sipp", "the Debian package sip-tester (apt-get install sip-tester)")

here = os.path.dirname(os.path.abspath(__file__))
w = lambda name: os.path.join(args.workdir, name)  # noqa: E731
with open(w("users.csv"), "w") as f:
    f.write(f"SEQUENTIAL\n{args.user};{args.password}\n")
limit = max(5, int(args.deadline.left()) - 2)
argv = [sipp, f"{args.relay_host}:{args.relay_port}", "-sf", os.path.join(here, "sipp_uac.xml"),
        "-i", args.local_ip, "-p", str(common.free_port()), "-mi", args.local_ip,
        "-t", "u1", "-m", "1", "-d", str(int(args.hold * 1000)),
        "-s", args.service, "-au", args.user, "-ap", args.password, "-inf", w("users.csv"),
        "-key", "domain", args.domain,
        "-timeout", f"{limit}s", "-timeout_error", "-nostdin",
        "-trace_logs", "-log_file", w("sipp.log"),
        "-trace_err", "-error_file", w("sipp.errors"),
        "-trace_msg", "-message_file", w("sipp.messages")]
proc = common.spawn(argv, stdin=subprocess.DEVNULL, stdout=open(w("sipp.out"), "wb"),
                    stderr=subprocess.STDOUT, cwd=args.workdir)
try:
    rc = proc.wait(timeout=args.deadline.left())
except subprocess.TimeoutExpired:
    rc = None
logged = []
try:
    with open(w("sipp.log")) as f:
        logged = [line.strip() for line in f if line.strip()]
except OSError:
    pass
for event in ("registered", "established", "closed"):
    if event in logged:
        common.emit(event)
if rc == 0 and "closed" in logged:
    common.finish(True)
common.log(common.tail(w("sipp.errors"), 30))
common.log(common.tail(w("sipp.messages"), 60))
reached = logged[-1] if logged else "nothing"
common.finish(False, f"sipp exited {rc} (last event: {reached})")
