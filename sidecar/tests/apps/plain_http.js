// An ordinary node:http app: it listens on PORT and knows nothing of
// clusterd (no fd 3, no cluster module). GET /?busy=MS blocks the event
// loop for MS milliseconds; /?sleep=MS answers after MS milliseconds without
// blocking it. LISTEN_DELAY_MS delays its listen().
const http = require('node:http');

const server = http.createServer((req, res) => {
  const query = new URL(req.url, 'http://app').searchParams;
  const end = Date.now() + Number(query.get('busy') || 0);
  while (Date.now() < end);
  setTimeout(() => {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify({ pid: process.pid, localPort: req.socket.localPort, node: process.version }));
  }, Number(query.get('sleep') || 0));
});
setTimeout(() => server.listen(process.env.PORT), Number(process.env.LISTEN_DELAY_MS || 0));
