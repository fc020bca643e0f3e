// An Express 5 app as its README writes it: app.listen(PORT), nothing for
// clusterd. GET /light answers at once; GET /?ms=N burns N ms of CPU
// (with benches/cpu-clock.js preloaded, of the process's CPU time).
const express = require('express');

const app = express();
app.get('/healthz', (req, res) => res.send('ok'));
app.get('/light', (req, res) => res.json({ ok: true }));
app.get('/', (req, res) => {
  const end = Date.now() + Number(req.query.ms || 0);
  while (Date.now() < end);
  res.json({ ok: true });
});
app.listen(Number(process.env.PORT || 8080), process.env.HOST || '0.0.0.0');
