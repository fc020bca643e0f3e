// Paced load over kept-alive connections, as an ingress controller keeps
// them to a pod: CONNECTIONS sockets of one keep-alive agent, each sending
// GET PATH, PACE_MS after the last answer, for DURATION_MS.
//   node keepalive_client.js PORT CONNECTIONS DURATION_MS PACE_MS PATH
// Prints {"event":"started"} after the first answers, then one summary:
// {"event":"done", ok, reused (answers on a kept-alive socket), refused
// (no connection could be opened: the port was closed), failed: [errors of
// requests that were sent]}.
const http = require('node:http');

const [port, connections, durationMs, paceMs, path] = process.argv.slice(2);
const agent = new http.Agent({ keepAlive: true, maxSockets: Number(connections) });
const end = Date.now() + Number(durationMs);
const summary = { event: 'done', ok: 0, reused: 0, refused: 0, failed: [] };
let started = false;
let running = Number(connections);

function next() {
  if (Date.now() >= end) {
    if (--running === 0) {
      agent.destroy();
      console.log(JSON.stringify(summary));
    }
    return;
  }
  let settled = false;
  const settle = (outcome) => {
    if (settled) return;
    settled = true;
    outcome();
    setTimeout(next, Number(paceMs));
  };
  const failed = (e) =>
    settle(() => {
      if (e.code === 'ECONNREFUSED') summary.refused++;
      else summary.failed.push(`${e.code || e.message}${req.reusedSocket ? ' (kept-alive socket)' : ''}`);
    });
  const req = http.get({ port: Number(port), host: '127.0.0.1', path, agent }, (res) => {
    res.resume();
    res.on('error', failed);
    res.on('close', () => res.complete || failed({ code: 'response cut short' }));
    res.on('end', () =>
      settle(() => {
        if (res.statusCode !== 200) return summary.failed.push(`status ${res.statusCode}`);
        summary.ok++;
        if (req.reusedSocket) summary.reused++;
        if (!started && summary.ok >= Number(connections)) {
          started = true;
          console.log(JSON.stringify({ event: 'started' }));
        }
      }),
    );
  });
  req.on('error', failed);
}

for (let i = 0; i < Number(connections); i++) next();
