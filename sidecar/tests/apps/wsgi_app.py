"""A WSGI app for gunicorn behind clusterd: answers with the clusterd worker
slot (WORKER_ID) and the process that served the request."""

import json
import os


def app(environ, start_response):
    body = json.dumps({"worker": int(os.environ.get("WORKER_ID", "0")), "pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
