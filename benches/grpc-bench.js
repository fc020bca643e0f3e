// The seed's scenario in gRPC, for benches/run (npm: @grpc/grpc-js, pinned,
// on NODE_PATH; no .proto: messages are UTF-8 strings sent as raw bytes).
//   server:  node --require benches/cpu-clock.js grpc-bench.js serve
//            HOST:PORT, h2c; /bench.Svc/Light answers at once,
//            /bench.Svc/Heavy busy-loops for the request's number of ms
//   client:  node grpc-bench.js drive PORT SECONDS LIGHT_RATE HEAVY_CALLS HEAVY_MS
//            keeps HEAVY_CALLS Heavy calls in flight (one channel each), and
//            after 0.5 s sends Light calls at a fixed LIGHT_RATE per second
//            (open loop, over 2 channels) for SECONDS; prints one JSON line
//            with the light latencies' p50/p99 (ms), the heavy calls/s and
//            p99, the failed calls of each and the calls each worker answered.
//   client:  node grpc-bench.js ping PORT   one Light call; exit 0 if it answered
'use strict';

const grpc = require('@grpc/grpc-js');

const bytes = { serialize: (s) => Buffer.from(s), deserialize: (b) => b.toString() };
const unary = (path) => ({
  path, requestStream: false, responseStream: false,
  requestSerialize: bytes.serialize, requestDeserialize: bytes.deserialize,
  responseSerialize: bytes.serialize, responseDeserialize: bytes.deserialize,
});
const service = { light: unary('/bench.Svc/Light'), heavy: unary('/bench.Svc/Heavy') };
const worker = process.env.WORKER_ID ?? process.env.NODE_APP_INSTANCE ?? '0';

// Burns CPU for `ms` ms (with cpu-clock.js preloaded, Date.now() is CPU time).
function busy(ms) {
  const end = Date.now() + ms;
  let x = 0;
  while (Date.now() < end) for (let i = 1; i < 1000; i++) x += Math.sqrt(i);
  return x;
}

function serve() {
  const server = new grpc.Server();
  server.addService(service, {
    light: (call, done) => done(null, worker),
    heavy: (call, done) => {
      busy(Number(call.request) || 50);
      done(null, worker);
    },
  });
  const addr = `${process.env.HOST ?? '127.0.0.1'}:${process.env.PORT ?? 8080}`;
  server.bindAsync(addr, grpc.ServerCredentials.createInsecure(), (err) => {
    if (err) throw err;
    console.log(`worker ${worker} (pid ${process.pid}) serving gRPC on ${addr}`);
  });
}

const Client = grpc.makeGenericClientConstructor(service, 'Svc');
// Every client its own HTTP/2 connection (grpc-js shares them by default),
// as separate clients would have: a connection balancer (PM2, Node cluster)
// then sees several connections to spread.
const channel = (port) =>
  new Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), { 'grpc.use_local_subchannel_pool': 1 });
const call = (client, method, msg) => new Promise((resolve) => {
  const t0 = process.hrtime.bigint();
  client[method](msg, { deadline: Date.now() + 30000 }, (err, reply) =>
    resolve({ ms: Number(process.hrtime.bigint() - t0) / 1e6, err: err ? err.code : null, worker: reply }));
});
const pct = (xs, p) => {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)];
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function drive(port, seconds, lightRate, heavyCalls, heavyMs) {
  const heavy = { ms: [], failed: {}, workers: {} };
  const light = { ms: [], failed: {}, workers: {} };
  let stop = false;
  const t0 = Date.now();
  const heavyLoops = Array.from({ length: heavyCalls }, async () => {
    const c = channel(port);
    while (!stop) {
      const r = await call(c, 'heavy', String(heavyMs));
      if (r.err === null) {
        heavy.ms.push(r.ms);
        heavy.workers[r.worker] = (heavy.workers[r.worker] ?? 0) + 1;
      } else {
        heavy.failed[r.err] = (heavy.failed[r.err] ?? 0) + 1;
        await sleep(10); // no busy loop against a server that is not there
      }
    }
    c.close();
  });
  await sleep(500); // heavy calls in flight first
  const lightClients = [channel(port), channel(port)];
  const pending = [];
  const start = Date.now();
  const total = Math.round(seconds * lightRate);
  for (let i = 0; i < total; i++) {
    const due = start + (i * 1000) / lightRate;
    if (due > Date.now()) await sleep(due - Date.now());
    pending.push(call(lightClients[i % 2], 'light', 'x').then((r) => {
      if (r.err === null) {
        light.ms.push(r.ms);
        light.workers[r.worker] = (light.workers[r.worker] ?? 0) + 1;
      } else light.failed[r.err] = (light.failed[r.err] ?? 0) + 1;
    }));
  }
  await Promise.all(pending);
  stop = true;
  await Promise.all(heavyLoops);
  const heavySeconds = (Date.now() - t0) / 1000;
  lightClients.forEach((c) => c.close());
  console.log(JSON.stringify({
    light: { n: light.ms.length, p50: pct(light.ms, 50), p99: pct(light.ms, 99), failed: light.failed,
      workers: light.workers },
    heavy: { n: heavy.ms.length, perSec: heavy.ms.length / heavySeconds, p99: pct(heavy.ms, 99), failed: heavy.failed,
      workers: heavy.workers },
  }));
}

const [mode, ...args] = process.argv.slice(2);
if (mode === 'serve') serve();
else if (mode === 'drive') drive(...args.map(Number)).catch((e) => { console.error(e); process.exit(1); });
else if (mode === 'ping') {
  call(channel(Number(args[0])), 'light', 'x').then((r) => process.exit(r.err === null ? 0 : 1));
} else {
  console.error('usage: grpc-bench.js serve | drive PORT SECONDS LIGHT_RATE HEAVY_CALLS HEAVY_MS | ping PORT');
  process.exit(2);
}
