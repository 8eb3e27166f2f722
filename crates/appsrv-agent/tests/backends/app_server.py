#!/usr/bin/python3
"""An application server behind appsrv-agent, written with Python's standard library only:
the `tcp://` backend of a service, and a client of the agent's control API.

It listens on 127.0.0.1 (a free port, printed first), takes one connection from the agent's
data gateway, reads the session preamble (`json` or `proxy-v2`), checks that it names the
expected subscriber and service, and then, by --mode:

  charges  checks that the API refuses a caller without the token or with a wrong one, and a
           charge for a session that is not this server's; lists the sessions; asks for two
           charges (the second twice with the same event id, and once more with that id and
           another amount, which must be refused); writes "charged 2" to the terminal, echoes
           what the terminal sends until it closes, then closes.
  end      follows the session's events (GET /v1/events), ends the session through the API,
           and checks that its own connection is closed by the agent and that the events say
           `ended` with cause `server-hang-up`; then charges the subscriber out of session.

Every step is printed as one JSON line on stdout ({"step": ..., ...}); the last is
{"result": "ok"} or {"result": "failed", "why": ...}, and the exit status is 0 or 1.
"""

import argparse
import http.client
import json
import socket
import struct
import sys
import threading
import time
import urllib.parse

TIMEOUT = 25.0


def emit(**fields):
    print(json.dumps(fields), flush=True)


class Failed(Exception):
    pass


def check(cond, why):
    if not cond:
        raise Failed(why)


class Api:
    """The agent's control API: HTTP on loopback, bearer token."""

    def __init__(self, addr, token):
        host, port = addr.rsplit(":", 1)
        self.host, self.port, self.token = host, int(port), token

    def call(self, method, path, body=None, token="default"):
        token = self.token if token == "default" else token
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        headers = {}
        if token is not None:
            headers["Authorization"] = "Bearer " + token
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        return resp.status, (json.loads(raw) if raw else None)

    def events(self, session_id, sink):
        """Follows the session's events on a thread, appending each to `sink`."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        query = urllib.parse.urlencode({"session_id": session_id}, quote_via=urllib.parse.quote)
        conn.request("GET", "/v1/events?" + query,
                     headers={"Authorization": "Bearer " + self.token})
        resp = conn.getresponse()
        check(resp.status == 200, "events stream answered %d" % resp.status)

        def follow():
            try:
                while True:
                    line = resp.readline()
                    if not line:
                        return
                    sink.append(json.loads(line))
            except (OSError, ValueError):
                return

        threading.Thread(target=follow, daemon=True).start()
        return conn


def read_exactly(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        check(chunk, "connection closed inside the preamble")
        data += chunk
    return data


def read_json_preamble(conn):
    line = b""
    while not line.endswith(b"\n"):
        line += read_exactly(conn, 1)
        check(len(line) < 8192, "preamble line too long")
    return json.loads(line)


PROXY_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def read_proxy_v2(conn):
    head = read_exactly(conn, 16)
    check(head[:12] == PROXY_SIG, "no PROXY v2 signature")
    check(head[12] == 0x21, "not version 2 / PROXY")
    family, length = head[13], struct.unpack("!H", head[14:16])[0]
    body = read_exactly(conn, length)
    if family == 0x11:
        src = socket.inet_ntop(socket.AF_INET, body[0:4])
        dst = socket.inet_ntop(socket.AF_INET, body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
        rest = body[12:]
    elif family == 0x21:
        src = socket.inet_ntop(socket.AF_INET6, body[0:16])
        dst = socket.inet_ntop(socket.AF_INET6, body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
        rest = body[36:]
    else:
        raise Failed("unexpected address family %#x" % family)
    tlvs = {}
    while rest:
        kind, n = rest[0], struct.unpack("!H", rest[1:3])[0]
        tlvs.setdefault(kind, rest[3:3 + n].decode())
        rest = rest[3 + n:]
    return {
        "session_id": tlvs.get(0xE0),
        "unique_id": tlvs.get(0x05),
        "subscriber": tlvs.get(0xE1),
        "service": tlvs.get(0xE2),
        "params": tlvs.get(0xE3),
        "terminal": "%s:%d" % (src, sport),
        "gateway": "%s:%d" % (dst, dport),
    }


def quoted(session_id):
    return urllib.parse.quote(session_id, safe="")


def mode_charges(api, conn, session):
    sid = session["session_id"]
    status, _ = api.call("GET", "/v1/sessions", token=None)
    check(status == 401, "no token: expected 401, got %d" % status)
    status, _ = api.call("GET", "/v1/sessions", token="not-the-token-at-all")
    check(status == 401, "wrong token: expected 401, got %d" % status)
    status, body = api.call("POST", "/v1/charges", token=None,
                            body={"event_id": "sneaky", "session_id": sid, "amount": 1})
    check(status == 401, "charge without token: expected 401, got %d" % status)
    emit(step="refused-without-token")

    status, body = api.call("GET", "/v1/sessions")
    check(status == 200, "list: %d %s" % (status, body))
    listed = [s for s in body["sessions"] if s["session_id"] == sid]
    check(len(listed) == 1, "session %s not listed: %s" % (sid, body))
    check(listed[0]["subscriber"] == session["subscriber"], "listed subscriber %s" % listed[0])
    emit(step="listed", session=listed[0])

    status, body = api.call("POST", "/v1/charges",
                            body={"event_id": "foreign-1", "session_id": "not-ours@elsewhere",
                                  "amount": 5})
    check(status == 404 and body["error"] == "unknown-session",
          "foreign session: expected 404 unknown-session, got %d %s" % (status, body))
    emit(step="refused-foreign-session", answer=body)

    first = {"event_id": "level-1", "session_id": sid, "amount": 25,
             "description": "level 1 unlocked"}
    status, body = api.call("POST", "/v1/charges", body=first)
    check(status == 200 and body["status"] == "confirmed", "first charge: %d %s" % (status, body))
    emit(step="charged", answer=body)

    second = {"event_id": "item-7", "session_id": sid, "units": 2, "unit_price": 5,
              "description": "2 potions"}
    for attempt in (1, 2):
        status, body = api.call("POST", "/v1/charges", body=second)
        check(status == 200 and body["status"] == "confirmed",
              "second charge, attempt %d: %d %s" % (attempt, status, body))
        emit(step="charged", attempt=attempt, answer=body)

    reused = dict(second, units=3)
    status, body = api.call("POST", "/v1/charges", body=reused)
    check(status == 409 and body["error"] == "event-id-reused",
          "reused event id: expected 409, got %d %s" % (status, body))
    emit(step="refused-reused-event-id")

    conn.sendall(b"charged 2\n")
    conn.settimeout(TIMEOUT)
    while True:
        data = conn.recv(4096)
        if not data:
            break
        conn.sendall(data)
    conn.close()
    emit(step="terminal-done")


def mode_end(api, conn, session):
    sid = session["session_id"]
    events = []
    stream = api.events(sid, events)
    status, body = api.call("POST", "/v1/sessions/%s/end" % quoted(sid),
                            body={"reason": "game over"})
    check(status == 200 and body["ended"] is True, "end: %d %s" % (status, body))
    emit(step="ended", answer=body)
    conn.settimeout(TIMEOUT)
    try:
        while conn.recv(4096):
            pass
        emit(step="backend-closed")
    except socket.timeout:
        raise Failed("the agent did not close the backend connection")
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        ended = [e for e in events if e.get("event") == "ended"]
        if ended:
            check(ended[0]["cause"] == "server-hang-up", "ended event: %s" % ended[0])
            emit(step="ended-event", event=ended[0])
            break
        time.sleep(0.05)
    else:
        raise Failed("no ended event; events: %s" % events)
    stream.close()
    status, body = api.call("POST", "/v1/sessions/%s/end" % quoted(sid))
    check(status == 404, "ending it again: expected 404, got %d %s" % (status, body))
    emit(step="end-again-refused")

    # Out of session: the subscriber this server has just served.
    status, body = api.call("POST", "/v1/charges",
                            body={"event_id": "renewal-1", "subscriber": session["subscriber"],
                                  "amount": 99, "description": "monthly renewal"})
    check(status == 200 and body["status"] == "confirmed" and body["session_id"] is None,
          "out-of-session charge: %d %s" % (status, body))
    emit(step="charged-out-of-session", answer=body)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--api", required=True, help="control API address, host:port")
    p.add_argument("--token-file", required=True)
    p.add_argument("--preamble", choices=["json", "proxy-v2"], required=True)
    p.add_argument("--subscriber", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--mode", choices=["charges", "end"], required=True)
    args = p.parse_args()
    with open(args.token_file) as f:
        api = Api(args.api, f.readline().strip())

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(60.0)
    emit(step="listening", port=listener.getsockname()[1])
    try:
        conn, peer = listener.accept()
        if args.preamble == "json":
            session = read_json_preamble(conn)
        else:
            session = read_proxy_v2(conn)
            check(session["unique_id"] == session["session_id"], "PP2 unique id %s" % session)
        emit(step="preamble", session=session)
        check(session["subscriber"] == args.subscriber, "subscriber %s" % session["subscriber"])
        check(session["service"] == args.service, "service %s" % session["service"])
        check(session["session_id"], "no session id")
        if args.mode == "charges":
            mode_charges(api, conn, session)
        else:
            mode_end(api, conn, session)
    except (Failed, OSError, ValueError, KeyError) as e:
        emit(result="failed", why="%s: %s" % (type(e).__name__, e))
        return 1
    emit(result="ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
