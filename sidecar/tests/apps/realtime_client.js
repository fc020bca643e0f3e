// Drives N real-time clients against clusterd for its tests, one JSON line
// per event on stdout, commands on stdin:
//   node realtime_client.js <ws|sio-websocket|sio-polling> <port> <n>
// At start: connects all, echoes once on each, prints {"event":"echo",...}.
//   "echo"       echoes once on each connection, prints {"event":"echo",...}
//   "reconnect"  waits (up to 20 s) until every client is connected again,
//                then echoes as "echo" does
// An echo line: {"event":"echo","pids":[pid of the worker that answered,
// or null],"errors":[...every client error seen since the last line]}.
// A connection that closes prints {"event":"closed","index":i}; clients
// reconnect by themselves. stdin closed: everything closes and it exits.
'use strict';

const readline = require('node:readline');

const [kind, port, count] = process.argv.slice(2);
const n = Number(count);
let errors = [];
let quitting = false;
const print = (event) => process.stdout.write(JSON.stringify(event) + '\n');

// Each client: { connected(), echo(msg) -> Promise<reply>, close() }.
function wsClient(index) {
  const WebSocket = require('ws');
  let ws;
  let waiting = new Map();
  let seq = 0;
  const open = () => {
    ws = new WebSocket(`ws://127.0.0.1:${port}/ws`);
    ws.on('message', (data) => {
      const reply = JSON.parse(data.toString());
      const done = waiting.get(reply.echo);
      waiting.delete(reply.echo);
      if (done) done(reply);
    });
    ws.on('error', (e) => errors.push(`ws ${index}: ${e.message}`));
    ws.on('close', () => {
      if (quitting) return;
      print({ event: 'closed', index });
      setTimeout(open, 100);
    });
  };
  open();
  return {
    connected: () => ws.readyState === 1,
    echo: (msg) => new Promise((resolve, reject) => {
      const key = `${msg} #${seq++}`;
      waiting.set(key, resolve);
      ws.send(key);
      setTimeout(() => reject(new Error('echo timed out')), 5000);
    }),
    close: () => ws.close(),
  };
}

function sioClient(index, transport) {
  const { io } = require('socket.io-client');
  const socket = io(`http://127.0.0.1:${port}`, {
    transports: [transport],
    // Keeps and sends cookies (clusterd's sticky cookie) in Node.js.
    withCredentials: true,
    reconnectionDelay: 100,
    reconnectionDelayMax: 300,
  });
  socket.on('connect_error', (e) => errors.push(`sio ${index}: ${e.message}`));
  socket.on('disconnect', (reason) => {
    if (quitting) return;
    errors.push(`sio ${index} disconnected: ${reason}`);
    print({ event: 'closed', index });
  });
  socket.io.on('error', (e) => errors.push(`sio ${index} manager: ${e.message}`));
  return {
    connected: () => socket.connected,
    echo: (msg) => socket.timeout(5000).emitWithAck('echo', msg),
    close: () => socket.close(),
  };
}

const clients = Array.from({ length: n }, (_, i) =>
  kind === 'ws' ? wsClient(i) : sioClient(i, kind.slice('sio-'.length)));

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function allConnected(timeoutMs) {
  const end = Date.now() + timeoutMs;
  while (!clients.every((c) => c.connected()) && Date.now() < end) await sleep(20);
}

async function echoAll() {
  const pids = await Promise.all(clients.map((c, i) =>
    c.echo(`hello ${i}`).then((r) => r.pid, (e) => { errors.push(`echo ${i}: ${e.message}`); return null; })));
  print({ event: 'echo', pids, errorCount: errors.length, errors: errors.slice(0, 20) });
  errors = [];
}

async function main() {
  await allConnected(20000);
  await echoAll();
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    if (line === 'reconnect') await allConnected(20000);
    await echoAll();
  }
  quitting = true;
  clients.forEach((c) => c.close());
  setTimeout(() => process.exit(0), 100);
}

main();
