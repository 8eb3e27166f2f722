#!/usr/bin/env python3
"""pjsua2 (PyPI pjsua2-python) through the relay: register, call, hold, hang up.

Runs the library in this process (no worker threads, events polled from the main loop),
with the null audio device, its SIP (UDP) and media transports bound to --local-ip. See
common.py for the arguments and the events printed.
"""

import os
import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

args = common.parse_args(__doc__)

try:
    import pjsua2 as pj
except ImportError as e:
    common.missing(f"python module pjsua2 ({e}; python {sys.executable})",
                   "the PyPI package pjsua2-python (python3 -m pip install pjsua2-python)")

state = {"reg": None, "call": None, "call_status": None, "media": False}


class Account(pj.Account):
    def onRegState(self, prm):
        state["reg"] = prm.code
        common.log(f"pjsua2: registration {prm.code} {prm.reason}")


class Call(pj.Call):
    def onCallState(self, prm):
        ci = self.getInfo()
        common.log(f"pjsua2: call {ci.stateText} {ci.lastStatusCode} {ci.lastReason}")
        if ci.state == pj.PJSIP_INV_STATE_CONFIRMED:
            state["call"] = "confirmed"
        elif ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            state["call"] = "disconnected"
            state["call_status"] = f"{ci.lastStatusCode} {ci.lastReason}"

    def onCallMediaState(self, prm):
        ci = self.getInfo()
        for i, mi in enumerate(ci.media):
            if mi.type == pj.PJMEDIA_TYPE_AUDIO and mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                state["media"] = True


ep = pj.Endpoint()
ep.libCreate()
acc = None
call = None


def poll_until(cond, timeout):
    end = min(args.deadline.left(), timeout)
    waited = 0.0
    while not cond() and waited < end:
        ep.libHandleEvents(20)
        waited += 0.02
    return cond()


def run():
    global acc, call
    ep_cfg = pj.EpConfig()
    ep_cfg.uaConfig.threadCnt = 0
    ep_cfg.uaConfig.mainThreadOnly = True
    ep_cfg.uaConfig.userAgent = "pjsua2-interop"
    ep_cfg.logConfig.level = 5
    ep_cfg.logConfig.consoleLevel = 0
    ep_cfg.logConfig.filename = os.path.join(args.workdir, "pjsua2.log")
    ep_cfg.medConfig.hasIoqueue = True
    ep.libInit(ep_cfg)

    tcfg = pj.TransportConfig()
    tcfg.port = 0
    tcfg.boundAddress = args.local_ip
    tcfg.publicAddress = args.local_ip
    ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
    ep.libStart()
    ep.audDevManager().setNullDev()

    relay = f"sip:{args.relay_host}:{args.relay_port}"
    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:{args.user}@{args.domain}"
    acfg.regConfig.registrarUri = f"sip:{args.domain}"
    acfg.regConfig.timeoutSec = 300
    acfg.sipConfig.proxies.append(f"{relay};lr")
    acfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "*", args.user, 0, args.password))
    acfg.mediaConfig.transportConfig.boundAddress = args.local_ip
    acfg.mediaConfig.transportConfig.publicAddress = args.local_ip
    acc = Account()
    acc.create(acfg)

    if not poll_until(lambda: state["reg"] is not None and state["reg"] // 100 == 2, 15):
        return f"no registration (last status {state['reg']})"
    common.emit("registered", status=state["reg"])

    call = Call(acc)
    prm = pj.CallOpParam(True)
    call.makeCall(f"sip:{args.service}@{args.domain}", prm)
    if not poll_until(lambda: state["call"] is not None, 20):
        return "the call was never answered"
    if state["call"] != "confirmed":
        return f"the call failed: {state['call_status']}"
    common.emit("established", media=state["media"])

    # The hold: the call stays up this long on purpose, while events are handled.
    poll_until(lambda: state["call"] != "confirmed", args.hold)
    if state["call"] != "confirmed":
        return f"the call ended during the hold: {state['call_status']}"
    call.hangup(pj.CallOpParam(True))
    if not poll_until(lambda: state["call"] == "disconnected", 10):
        return "the hangup never completed"
    common.emit("closed", status=state["call_status"])
    return None


try:
    failure = run()
except pj.Error as e:
    failure = f"pjsua2 error: {e.info()}"
# Call and Account go before libDestroy, or pjsua asserts at exit.
if call is not None:
    del call
if acc is not None:
    try:
        acc.shutdown()
    except pj.Error:
        pass
    del acc
ep.libDestroy()
del ep
if failure:
    common.log(common.tail(os.path.join(args.workdir, "pjsua2.log"), 60))
common.finish(failure is None, failure or "")
