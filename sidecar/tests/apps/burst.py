"""A worker that writes LINES numbered lines as fast as it can, then serves
HTTP on PORT. Each line: w<WORKER_ID> <seq, 7 digits> <seq % 41 x's>."""
import http.server
import os
import sys

wid = os.environ["WORKER_ID"].encode()
lines = int(os.environ["LINES"])
out = sys.stdout.buffer
batch = []
for i in range(lines):
    batch.append(b"w%s %07d %s\n" % (wid, i, b"x" * (i % 41)))
    if len(batch) == 2000:
        out.write(b"".join(batch))
        batch.clear()
out.write(b"".join(batch))
out.write(b"burst done\n")
out.flush()


class Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


class Server(http.server.HTTPServer):
    def handle_error(self, request, client_address):
        pass  # a probe that hangs up early


Server(("127.0.0.1", int(os.environ["PORT"])), Quiet).serve_forever()
