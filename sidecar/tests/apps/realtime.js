// A worker speaking what real-time Node apps speak, for clusterd's tests:
// a `ws` WebSocket echo on /ws and a socket.io server (both transports) on
// /socket.io/, beside plain HTTP (every other path: 200 and the worker id).
// Needs the npm packages `ws` and `socket.io` (NODE_PATH; the tests install
// them, pinned, into a cache outside the repo). Serves HOST:PORT.
'use strict';

const http = require('node:http');
const { WebSocketServer } = require('ws');
const { Server } = require('socket.io');

const worker = process.env.WORKER_ID ?? '0';
const reply = (echo) => ({ worker, pid: process.pid, echo });

const server = http.createServer((req, res) => {
  res.setHeader('x-worker-id', worker);
  res.end(JSON.stringify(reply(req.url)));
});

const wss = new WebSocketServer({ noServer: true });
wss.on('connection', (ws) => {
  ws.on('message', (data) => ws.send(JSON.stringify(reply(data.toString()))));
});
server.on('upgrade', (req, socket, head) => {
  if (req.url.startsWith('/ws')) {
    wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
  }
});

const io = new Server(server, { destroyUpgrade: false });
// e.g. "Session ID unknown": a polling request reached another worker than
// its handshake (the tests count these in clusterd's log).
io.engine.on('connection_error', (err) => console.log(`engine.io error: ${err.message}`));
io.on('connection', (socket) => {
  socket.on('echo', (msg, ack) => ack(reply(msg)));
});

server.listen(Number(process.env.PORT ?? 8080), process.env.HOST ?? '0.0.0.0');
server.on('listening', () => console.log(`worker ${worker} (pid ${process.pid}) listening`));
