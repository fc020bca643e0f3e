// Node's own `cluster` module as a peer for the benchmarks: a primary that
// forks N workers of the demo app (default scheduling: SCHED_RR, the primary
// accepts and hands connections to workers round robin).
//
//   node benches/node-cluster.js N PORT [--require preload.js]
// Workers run examples/app/server.js with PORT set; no restarts.
'use strict';
const cluster = require('node:cluster');
const path = require('node:path');

const n = Number(process.argv[2] ?? 2);
const port = String(process.argv[3] ?? 8080);
const execArgv = process.argv.slice(4);
const app = path.join(__dirname, '..', 'examples', 'app', 'server.js');

cluster.setupPrimary({ exec: app, execArgv });
let listening = 0;
for (let i = 0; i < n; i++) {
  const w = cluster.fork({ PORT: port, HOST: '127.0.0.1', WORKER_ID: String(i) });
  w.on('listening', () => {
    listening += 1;
    if (listening === n) console.log(`node-cluster: ${n} workers listening on ${port}`);
  });
}
function stop() {
  for (const w of Object.values(cluster.workers)) w.process.kill('SIGTERM');
  setTimeout(() => process.exit(0), 3000).unref();
  cluster.on('exit', () => {
    if (Object.keys(cluster.workers).length === 0) process.exit(0);
  });
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
