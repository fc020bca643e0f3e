// An ordinary Node app, as it would run without clusterd: it listens on
// PORT and nothing else (no fd 3, no cluster module, no signal handler).
// Under clusterd's `auto` port mode its workers share the port through
// Node's cluster protocol, with no proxy in between.
const http = require('node:http');

http
  .createServer((req, res) => {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ pid: process.pid, port: req.socket.localPort, version: process.env.APP_VERSION || 'v1' }));
  })
  .listen(process.env.PORT || 8080);
