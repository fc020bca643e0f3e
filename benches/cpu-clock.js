// Preloaded into the demo app (`node --require benches/cpu-clock.js examples/app/server.js`).
//
// The demo app's busy loop runs until Date.now() passes a deadline, i.e. for
// a fixed *wall-clock* time. Two workers sharing one CPU then each finish
// "50 ms of work" in 50 ms of wall time with only 25 ms of CPU, and a
// throughput benchmark measures how many loops fit in wall time, not how
// much CPU there is. This preload makes Date.now() advance with the
// process's CPU time instead (offset so it starts at the real time), so a
// heavy request costs a fixed amount of CPU and throughput is bounded by
// the CPUs given, as it would be for real work. Nothing else in the app
// reads Date.now() (Node's HTTP Date header and timers use their own clocks).
'use strict';
const realNow = Date.now;
const base = realNow();
const cpu0 = process.cpuUsage();
Date.now = function cpuNow() {
  const u = process.cpuUsage(cpu0);
  return base + Math.floor((u.user + u.system) / 1000);
};
