"""Runs the Python demo app with its busy loop measured in CPU time.

    python3 benches/cpu_clock.py examples/app/server.py

Same reason as cpu-clock.js: the app's busy loop runs for a fixed
wall-clock time (time.monotonic), so it would not cost a fixed amount of
CPU. time.monotonic is replaced by time.thread_time (the calling handler
thread's CPU time) for the app only; threading and socketserver are
imported first so they keep the real clock.
"""

import runpy
import socketserver  # noqa: F401  (binds the real clock before the patch)
import sys
import threading  # noqa: F401
import time

time.monotonic = time.thread_time
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
