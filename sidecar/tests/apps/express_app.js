// An Express 5 app as its README writes it: app.listen(PORT), nothing else.
const express = require('express');

const app = express();
app.get('/', (req, res) => res.json({ pid: process.pid, localPort: req.socket.localPort, node: process.version }));
app.listen(process.env.PORT);
