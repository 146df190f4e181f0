#!/usr/bin/env python3
"""An ordered webhook with a large backlog behind a retrying delivery, and
what it costs everyone else: single-event publishes to another instance
(whose webhook has a fast receiver) at a fixed rate, their 202 latency.

    python3 bench/ordered-backlog.py <eventgate binary> <label> [sqlite|postgres] [backlog]

1. The gateway runs with EVENTGATE_WEBHOOK_MAX_PENDING=1: instance `slow`
   with an ordered webhook to a closed port gets `backlog` events, all but
   one dead letters at once (`backlog full`).
2. Restarted with the bound lifted, `/retry` puts them all back: `backlog`
   pending rows, the oldest failing and retried every 2 s, the rest held
   behind it.
3. Instance `fast` (webhook to this script's receiver) gets one event per
   publish, 100 per second for SECS (20) seconds; prints one JSON line with
   the publishes' p50 / p99 / max in ms and the deliveries received.

Every figure is from one run; compare builds run in turn in one sitting.
"""
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

TOKEN = "bench-account-token-0123456789abcdef0123"
PORT = 8094
PG_URL = os.environ.get("PG_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def free_closed_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Receiver(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    count = 0
    lock = threading.Lock()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with Receiver.lock:
            Receiver.count += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def serve(binary, db, log, **env):
    e = dict(os.environ)
    e.update(
        EVENTGATE_BIND=f"127.0.0.1:{PORT}",
        EVENTGATE_DATABASE_URL=db,
        EVENTGATE_ACCOUNT_TOKEN=TOKEN,
        EVENTGATE_RATE_LIMIT_PER_MINUTE="100000000",
        EVENTGATE_RATE_LIMIT_INSTANCE_NEW_PER_MINUTE="100000000",
        EVENTGATE_LOG="warn",
        EVENTGATE_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        EVENTGATE_WEBHOOK_RETRY_SCHEDULE_SECS=",".join(["2"] * 100),
    )
    e.update(env)
    p = subprocess.Popen([binary, "serve"], env=e, stdout=log, stderr=log)
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=0.1).close()
            return p
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the gateway did not start")


def call(conn, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    conn.request(method, path, body=data, headers=headers)
    r = conn.getresponse()
    text = r.read()
    return r.status, text


def stop(p):
    p.terminate()
    p.wait(timeout=30)


def main():
    binary, label = sys.argv[1], sys.argv[2]
    backend = sys.argv[3] if len(sys.argv) > 3 else "sqlite"
    backlog = int(sys.argv[4]) if len(sys.argv) > 4 else 100_000
    secs = int(os.environ.get("SECS", "20"))
    work = tempfile.mkdtemp()
    if backend == "sqlite":
        db = os.path.join(work, "o.sqlite3")
    else:
        database = f"eg_ordered_{os.getpid()}"
        subprocess.run(["psql", "-q", PG_URL, "-c", f"CREATE DATABASE {database}"], check=True)
        db = PG_URL.rsplit("/", 1)[0] + "/" + database
    log = open(os.path.join(work, "eventgate.log"), "w")
    rx = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=rx.serve_forever, daemon=True).start()
    try:
        p = serve(binary, db, log, EVENTGATE_WEBHOOK_MAX_PENDING="1")
        c = http.client.HTTPConnection("127.0.0.1", PORT)
        for name in ("slow", "fast"):
            assert call(c, "POST", "/api/instance/new", {"name": name})[0] == 201
        dead_url = f"http://127.0.0.1:{free_closed_port()}/"
        st, _ = call(c, "POST", "/api/events/webhook/slow",
                     {"enabled": True, "url": dead_url, "ordered": True})
        assert st == 200, st
        batch = [{"event": "message.status", "data": {"n": i}} for i in range(1000)]
        for _ in range(backlog // 1000):
            assert call(c, "POST", "/api/events/publish/slow", batch)[0] == 202
        stop(p)
        p = serve(binary, db, log)
        c = http.client.HTTPConnection("127.0.0.1", PORT)
        st, text = call(c, "POST", "/api/events/webhook/slow/retry", {})
        requeued = json.loads(text)["requeued"]
        st, _ = call(c, "POST", "/api/events/webhook/fast",
                     {"enabled": True, "url": f"http://127.0.0.1:{rx.server_port}/"})
        assert st == 200, st
        time.sleep(3)  # the put-back letters' first claims
        lat = []
        start = time.monotonic()
        for i in range(secs * 100):
            due = start + i / 100
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            t0 = time.monotonic()
            st, _ = call(c, "POST", "/api/events/publish/fast",
                         {"event": "message.status", "data": {"i": i}})
            lat.append((time.monotonic() - t0) * 1000)
            assert st == 202, st
        time.sleep(2)
        stop(p)
    finally:
        rx.shutdown()
        if backend != "sqlite":
            subprocess.run(["psql", "-q", PG_URL, "-c",
                            f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"], check=False)
    lat.sort()
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 2)
    print(json.dumps({
        "label": label, "backend": backend, "requeued": requeued,
        "publishes": len(lat), "p50_ms": pick(0.5), "p99_ms": pick(0.99),
        "max_ms": round(lat[-1], 2), "received": Receiver.count,
    }))


if __name__ == "__main__":
    main()
