// An ordinary node:http app: it listens on PORT and knows nothing of
// clusterd (no fd 3, no cluster module). GET /?busy=MS blocks the event
// loop for MS milliseconds. LISTEN_DELAY_MS delays its listen().
const http = require('node:http');

const server = http.createServer((req, res) => {
  const busy = Number(new URL(req.url, 'http://app').searchParams.get('busy') || 0);
  const end = Date.now() + busy;
  while (Date.now() < end);
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({ pid: process.pid, localPort: req.socket.localPort, node: process.version }));
});
setTimeout(() => server.listen(process.env.PORT), Number(process.env.LISTEN_DELAY_MS || 0));
