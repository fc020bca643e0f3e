"""Workers with a known appetite, for clusterd's CPU and memory figures.

    usage.py MODE...   worker WORKER_ID takes the MODE at that index:
      burn             keeps one core busy
      alloc:MIB        holds MIB MiB resident, then idles
      idle             idles

Each also listens on PORT (clusterd's proxy probes it) from a thread.
Standard library only.
"""

import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Ok(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args):
        pass


def serve():
    port = int(os.environ.get("PORT", "0"))
    ThreadingHTTPServer((os.environ.get("HOST", "127.0.0.1"), port), Ok).serve_forever()


modes = sys.argv[1:] or ["idle"]
mode = modes[int(os.environ.get("WORKER_ID", "0")) % len(modes)]
held = None
if mode.startswith("alloc:"):
    # Written byte by byte: resident, not just reserved.
    held = bytearray(b"x" * (int(mode.split(":")[1]) << 20))
threading.Thread(target=serve, daemon=True).start()
if mode == "burn":
    while True:
        pass
while True:
    time.sleep(1)
