#!/usr/bin/env python3
"""Demo app for clusterd, Python standard library only (same routes as server.js).

Listens the way clusterd tells it to:
  LISTEN_FDS=1          inherit mode: the shared socket is fd 3
  CLUSTERD_REUSEPORT=1  reuseport mode: bind PORT with SO_REUSEPORT
  otherwise             HOST:PORT (clusterd sets both; alone: 0.0.0.0:8080 by default)
"""

import json
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

WORKER = os.environ.get("WORKER_ID", "0")
HEAVY_MS = float(os.environ.get("HEAVY_MS", "50"))
FAULTS = os.environ.get("FAULTS") == "1"


def busy(ms):
    """Burns CPU for `ms` milliseconds."""
    end = time.monotonic() + ms / 1000
    x = 0.0
    while time.monotonic() < end:
        for i in range(1, 1000):
            x += i ** 0.5
    return x


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        url = urlparse(self.path)
        path = url.path
        if path in ("/", "/report"):
            try:
                ms = float(parse_qs(url.query).get("ms", [HEAVY_MS])[0])
            except ValueError:
                ms = HEAVY_MS
            busy(ms)
            return self.reply(200, {"path": path, "ms": ms})
        if path in ("/light", "/healthz", "/pid"):
            return self.reply(200, {"path": path})
        if FAULTS and path == "/crash":
            self.reply(200, {"path": path})
            os._exit(1)
        return self.reply(404, {"path": path, "error": "not found"})

    def reply(self, status, body):
        data = json.dumps({"worker": int(WORKER), "pid": os.getpid(), **body}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("x-worker-id", WORKER)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def make_server():
    if os.environ.get("LISTEN_FDS") == "1":
        server = ThreadingHTTPServer(("0.0.0.0", 0), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = socket.socket(fileno=3)
        return server
    port = int(os.environ.get("PORT", "8080"))
    if os.environ.get("CLUSTERD_REUSEPORT") == "1":
        server = ThreadingHTTPServer((os.environ.get("HOST", "0.0.0.0"), port), Handler, bind_and_activate=False)
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        server.server_bind()
        server.server_activate()
        return server
    return ThreadingHTTPServer((os.environ.get("HOST", "0.0.0.0"), port), Handler)


def main():
    server = make_server()
    server.daemon_threads = True

    def stop(signum, _frame):
        print(f"worker {WORKER} got signal {signum}, closing", flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"worker {WORKER} (pid {os.getpid()}) listening", flush=True)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
