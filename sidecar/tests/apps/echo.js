// Echoes what the worker received: the raw header lines, as node:http
// parsed them, and the body. For the proxy's request-normalisation tests.
const http = require('node:http');

http
  .createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ rawHeaders: req.rawHeaders, body: Buffer.concat(chunks).toString('latin1') }));
    });
  })
  .listen(process.env.PORT);
