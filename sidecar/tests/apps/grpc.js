// A gRPC worker and client for clusterd's tests (npm: @grpc/grpc-js; no
// .proto: messages are UTF-8 strings, (de)serialized as raw bytes).
//   server:  node grpc.js serve          (HOST:PORT, h2c)
//   client:  node grpc.js call PORT N    N unary Echo calls and one
//            server-streaming Count call; prints one JSON line:
//            {"unary":[worker ids],"stream":[worker ids of each message],
//             "trailer":value of the trailer "x-worker" of the stream,
//             "failed":{"code":..,"details":..} of a call made to fail}
'use strict';

const grpc = require('@grpc/grpc-js');

const bytes = { serialize: (s) => Buffer.from(s), deserialize: (b) => b.toString() };
const method = (path, responseStream) => ({
  path, requestStream: false, responseStream,
  requestSerialize: bytes.serialize, requestDeserialize: bytes.deserialize,
  responseSerialize: bytes.serialize, responseDeserialize: bytes.deserialize,
});
const service = {
  echo: method('/test.Echo/Echo', false),
  count: method('/test.Echo/Count', true),
  fail: method('/test.Echo/Fail', false),
};

const worker = process.env.WORKER_ID ?? '0';

if (process.argv[2] === 'serve') {
  const server = new grpc.Server();
  server.addService(service, {
    echo: (call, done) => done(null, `${worker} ${call.request}`),
    count: (call) => {
      for (let i = 0; i < 5; i++) call.write(`${worker} ${i}`);
      const trailer = new grpc.Metadata();
      trailer.set('x-worker', worker);
      call.end(trailer);
    },
    fail: (call, done) => done({ code: grpc.status.RESOURCE_EXHAUSTED, details: `worker ${worker} says no` }),
  });
  const addr = `${process.env.HOST ?? '0.0.0.0'}:${process.env.PORT ?? 8080}`;
  server.bindAsync(addr, grpc.ServerCredentials.createInsecure(), (err) => {
    if (err) throw err;
    console.log(`worker ${worker} (pid ${process.pid}) serving gRPC on ${addr}`);
  });
} else {
  const [port, n] = process.argv.slice(3).map(Number);
  const Client = grpc.makeGenericClientConstructor(service, 'Echo');
  const client = new Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  const unary = (i) => new Promise((resolve, reject) =>
    client.echo(`hi ${i}`, (err, reply) => (err ? reject(err) : resolve(reply.split(' ')[0]))));
  (async () => {
    const result = { unary: [], stream: [] };
    for (let i = 0; i < n; i++) result.unary.push(await unary(i));
    await new Promise((resolve, reject) => {
      const call = client.count('go');
      call.on('data', (m) => result.stream.push(m.split(' ')[0]));
      call.on('status', (s) => { result.trailer = s.metadata.get('x-worker')[0]; resolve(); });
      call.on('error', reject);
    });
    result.failed = await new Promise((resolve) =>
      client.fail('x', (err) => resolve(err ? { code: err.code, details: err.details } : null)));
    console.log(JSON.stringify(result));
    client.close();
  })().catch((e) => { console.log(JSON.stringify({ error: e.message, code: e.code })); process.exit(1); });
}
