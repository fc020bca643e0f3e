//! Signals clusterd handles itself. As PID 1 the kernel would ignore
//! SIGTERM/SIGINT without a handler, so every one of these is caught and
//! turned into a supervisor event: TERM/INT = graceful shutdown, QUIT = quick
//! shutdown, HUP = rolling reload, USR1/USR2 = forwarded to the workers.

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc::UnboundedSender;

use crate::supervisor::Event;

const HANDLED: [Signal; 6] =
    [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGQUIT, Signal::SIGUSR1, Signal::SIGUSR2];

/// Installs the handlers now (before any worker exists) and forwards each
/// delivery to the supervisor.
pub fn install(events: UnboundedSender<Event>) -> std::io::Result<()> {
    for sig in HANDLED {
        let mut stream = signal(SignalKind::from_raw(sig as i32))?;
        let events = events.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if events.send(Event::Signal(sig)).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}
