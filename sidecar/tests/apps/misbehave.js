// A worker that misbehaves the way ordinary apps do, for clusterd's tests
// (no npm dependencies). Serves like examples/app/server.js (HOST:PORT, or
// fd 3 with LISTEN_FDS=1) and answers every path with 200 and its worker id,
// except:
//   /binary         writes bytes that are not UTF-8 to stdout and stderr first
//   /hang           blocks the event loop for good
//   /grandchild     starts `sleep 600` in a session of its own (setsid) and
//                   answers with its pid
//   /leak           allocates (and touches) 16 MiB every 10 ms, for good
// At start, optional output:
//   NOISE_BYTES=N      N bytes of mixed output (invalid UTF-8, text, runs
//                      without a newline) spread over NOISE_SECONDS (default
//                      5); then the line "noise done"
//   LONG_LINE_BYTES=N  one line of N bytes without a newline; then a newline
//                      and the line "long line done"
//   IGNORE_SIGTERM=1   SIGTERM does nothing
'use strict';

const http = require('node:http');
const { spawn } = require('node:child_process');

const worker = process.env.WORKER_ID ?? '0';
const NOT_UTF8 = Buffer.from([0xff, 0xfe, 0x20, 0xc3, 0x28, 0x80, 0x0a]);

// Writes `total` bytes of `piece` to stdout, waiting for 'drain' as a
// well-behaved app does, then `done()`.
function pour(total, piece, done) {
  let written = 0;
  const more = () => {
    while (written < total) {
      const chunk = piece.subarray(0, total - written);
      written += chunk.length;
      if (!process.stdout.write(chunk)) return process.stdout.once('drain', more);
    }
    done();
  };
  more();
}

function mixed(i) {
  switch (i % 3) {
    case 0: return Buffer.concat([NOT_UTF8, Buffer.alloc(4096, 0xe9)]); // Latin-1 é: not UTF-8
    case 1: return Buffer.from(`line ${i} of plain text\n`.repeat(64));
    default: return Buffer.alloc(40_000, 'z'); // longer than clusterd's line limit, no newline
  }
}

const server = http.createServer((req, res) => {
  const path = new URL(req.url, 'http://localhost').pathname;
  let body = '';
  if (path === '/binary') {
    process.stdout.write(NOT_UTF8);
    process.stderr.write(NOT_UTF8);
    console.log(`worker ${worker} wrote bytes that are not UTF-8`);
  } else if (path === '/hang') {
    for (;;) {}
  } else if (path === '/leak') {
    const hoard = [];
    setInterval(() => hoard.push(Buffer.alloc(16 << 20, 1)), 10);
    return;
  } else if (path === '/grandchild') {
    const child = spawn('sleep', ['600'], { detached: true, stdio: 'ignore' });
    child.unref();
    body = String(child.pid);
  } else if (path === '/host') {
    body = req.headers.host ?? '(none)';
  }
  // EXIT_AFTER=N: done after N requests, as some apps are (exit code 0),
  // and gracefully: from the Nth request on each answer closes its
  // connection, the server stops listening, and the process exits once its
  // connections are closed (an exit at once would cut off more requests
  // on the wire).
  const last = exitAfter > 0 && ++served >= exitAfter;
  const headers = { 'x-worker-id': worker, 'content-length': Buffer.byteLength(body) };
  if (last) headers.connection = 'close';
  res.writeHead(200, headers);
  res.end(body, () => {
    if (last && server.listening) server.close(() => process.exit(0));
  });
});
const exitAfter = Number(process.env.EXIT_AFTER ?? 0);
let served = 0;
server.keepAliveTimeout = 65_000;

if (process.env.LISTEN_FDS === '1') {
  server.listen({ fd: 3 });
} else {
  server.listen(Number(process.env.PORT ?? 8080), process.env.HOST ?? '127.0.0.1');
}

const noise = Number(process.env.NOISE_BYTES ?? 0);
if (noise > 0) {
  // Every 10 ms a share of it: stdout is a pipe, written synchronously, so
  // the app stalls whenever clusterd stops reading.
  const ticks = Number(process.env.NOISE_SECONDS ?? 5) * 100;
  let tick = 0;
  const timer = setInterval(() => {
    const start = Math.floor((noise * tick) / ticks);
    const end = Math.floor((noise * (tick + 1)) / ticks);
    for (let i = start, n = 0; i < end; n++) {
      const chunk = mixed(tick + n).subarray(0, end - i);
      process.stdout.write(chunk);
      i += chunk.length;
    }
    if (++tick === ticks) {
      clearInterval(timer);
      console.log('\nnoise done');
    }
  }, 10);
}
const long = Number(process.env.LONG_LINE_BYTES ?? 0);
// The closing line waits a second: clusterd's log queue, lossy by design,
// may drop lines while the burst is written out, and the test waits for it.
if (long > 0) pour(long, Buffer.alloc(1 << 20, 'x'), () => setTimeout(() => console.log('\nlong line done'), 1000));

if (process.env.IGNORE_SIGTERM === '1') {
  process.on('SIGTERM', () => console.log(`worker ${worker} ignores SIGTERM`));
} else {
  process.on('SIGTERM', () => server.close(() => process.exit(0)));
}
