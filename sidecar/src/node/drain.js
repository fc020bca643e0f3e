// clusterd's node-mode preload (NODE_OPTIONS=--require=<this file>).
//
// A cluster worker told to disconnect closes its servers, but Node's
// server.close() leaves busy keep-alive connections open, and clients keep
// sending requests on them until clusterd's SIGTERM cuts them off. Before
// the disconnect clusterd sends NODE_CLUSTERD_DRAIN: from then on every
// response of this worker says `Connection: close`, so each kept-alive
// connection closes after its in-flight request. Nothing changes before
// that, and the app sees nothing (NODE_ messages never reach its
// process.on('message')).
'use strict';
(() => {
  // Only this process: the app's own child processes do not load it.
  const own = `--require=${__filename}`;
  const options = (process.env.NODE_OPTIONS || '').split(' ').filter((o) => o && o !== own);
  if (options.length > 0) process.env.NODE_OPTIONS = options.join(' ');
  else delete process.env.NODE_OPTIONS;
  if (!require('node:cluster').isWorker) return;

  let draining = false;
  function drain() {
    if (draining) return;
    draining = true;
    const { ServerResponse } = require('node:http');
    const storeHeader = ServerResponse.prototype._storeHeader;
    if (typeof storeHeader !== 'function') return;
    // Headers not yet sent (in-flight requests, requests still arriving on
    // kept-alive connections) get `Connection: close`, and Node closes the
    // connection once the response is written. Idle connections: Node ≥ 19's
    // server.close() closes them at the disconnect; Node 18's keep-alive
    // timeout does.
    ServerResponse.prototype._storeHeader = function (...args) {
      this.shouldKeepAlive = false;
      return storeHeader.apply(this, args);
    };
  }

  process.on('internalMessage', (message) => {
    if (message && message.cmd === 'NODE_CLUSTERD_DRAIN') drain();
    // Also a disconnect without the drain message before it.
    else if (message && message.cmd === 'NODE_CLUSTER' && message.act === 'disconnect') drain();
  });
})();
