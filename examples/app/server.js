// Demo app for clusterd (no npm dependencies).
//
// Listens the way clusterd tells it to:
//   LISTEN_FDS=1          inherit mode: the shared socket is fd 3
//   CLUSTERD_REUSEPORT=1  reuseport mode: bind PORT with SO_REUSEPORT (Node >= 22.12)
//   otherwise             HOST:PORT (clusterd sets both; alone: 0.0.0.0:8080 by default)
//
// Routes: /  and /report  CPU-bound for HEAVY_MS ms (default 50, ?ms= per request)
//         /light          answers at once
//         /healthz        200
//         /pid            the worker's pid
//         /hang, /crash   fault injection, only with FAULTS=1
// Every response carries the worker id, pid and host (in a pod: the pod's name)
// in a JSON body, and the worker id in the x-worker-id header.
'use strict';

const http = require('node:http');
const os = require('node:os');

const worker = process.env.WORKER_ID ?? '0';
const heavyMs = Number(process.env.HEAVY_MS ?? 50);
const faults = process.env.FAULTS === '1';

// Burns CPU for `ms` milliseconds; returns something so it is not optimized away.
function busy(ms) {
  const end = Date.now() + ms;
  let x = 0;
  while (Date.now() < end) {
    for (let i = 1; i < 1000; i++) x += Math.sqrt(i);
  }
  return x;
}

function reply(res, status, body) {
  const json = JSON.stringify({ worker: Number(worker), pid: process.pid, host: os.hostname(), ...body });
  res.writeHead(status, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(json),
    'x-worker-id': worker,
  });
  res.end(json);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://localhost');
  const path = url.pathname;
  if (path === '/' || path === '/report') {
    const ms = Number(url.searchParams.get('ms') ?? heavyMs);
    busy(Number.isFinite(ms) ? ms : heavyMs);
    return reply(res, 200, { path, ms });
  }
  if (path === '/light') return reply(res, 200, { path });
  if (path === '/healthz') return reply(res, 200, { path, ok: true });
  if (path === '/pid') return reply(res, 200, { path });
  if (faults && path === '/hang') {
    for (;;) {} // blocks the event loop for good: a hung worker
  }
  if (faults && path === '/crash') {
    reply(res, 200, { path });
    return setImmediate(() => process.exit(1));
  }
  return reply(res, 404, { path, error: 'not found' });
});
// Longer than clusterd's pooled-connection idle timeout, so the proxy closes first.
server.keepAliveTimeout = 65_000;

if (process.env.LISTEN_FDS === '1') {
  server.listen({ fd: 3 });
} else if (process.env.CLUSTERD_REUSEPORT === '1') {
  const [major, minor] = process.versions.node.split('.').map(Number);
  if (major < 22 || (major === 22 && minor < 12)) {
    console.error(`reusePort needs Node >= 22.12, this is ${process.version}: the port will not be shared`);
  }
  server.listen({ port: Number(process.env.PORT), host: process.env.HOST ?? '0.0.0.0', reusePort: true });
} else {
  server.listen(Number(process.env.PORT ?? 8080), process.env.HOST ?? '0.0.0.0');
}
server.on('listening', () => console.log(`worker ${worker} (pid ${process.pid}) listening`));

// Graceful stop: finish in-flight requests, then exit.
function stop(signal) {
  console.log(`worker ${worker} got ${signal}, closing`);
  server.close(() => process.exit(0));
  server.closeIdleConnections();
  setTimeout(() => process.exit(0), 10_000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
