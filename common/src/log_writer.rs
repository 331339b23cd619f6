//! The log lines' way to stdout: gathered in memory by the threads that
//! log, written by a thread of their own at most `WRITE_EVERY` later.
//!
//! Why not a channel to a writer thread (`tracing-appender`, used until
//! 2026-12-05): a stage logs one line per message, a few hundred µs
//! apart, so that thread was asleep at nearly every line, and every line
//! paid a wake-up, two context switches and a `write` of its own. Here
//! the first line of a batch wakes the thread, which then waits
//! `WRITE_EVERY` and writes everything gathered meanwhile in one `write`;
//! the lines after the first only copy their bytes under a lock held
//! for that copy. A handler never waits for the write itself (a pipe to
//! a slow log collector would otherwise stall the runtime's workers)
//! unless `MAX_GATHERED` bytes are waiting, and no line is dropped (at
//! exit, the lines a reader that has stopped reading never takes are
//! left after `STOP_WAIT`).

use std::io::Write as _;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// How long the first line of a batch waits for the others.
const WRITE_EVERY: Duration = Duration::from_millis(50);
/// Gathered bytes past which the thread writes at once.
const WRITE_AT: usize = 256 * 1024;
/// Gathered bytes past which a logging call waits for the thread (about
/// 10,000 lines; they take memory only while a reader is behind).
const MAX_GATHERED: usize = 4 * 1024 * 1024;

/// How long a stage's exit waits for the gathered lines to be written (a
/// reader that has stopped reading would otherwise hold the exit forever).
const STOP_WAIT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Gathered {
    bytes: Vec<u8>,
    /// The exit has begun: the thread writes what is gathered and ends.
    stopped: bool,
    /// The thread has ended (or never started): lines go straight to
    /// stdout.
    finished: bool,
}

#[derive(Default)]
struct Shared {
    gathered: Mutex<Gathered>,
    /// Lines to write: the first of a batch, `WRITE_AT` bytes, or the stop.
    ready: Condvar,
    /// The thread took what was gathered.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Gathered> {
        // Nothing panics while holding the lock; a poisoned one is as good.
        self.gathered.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The tracing subscriber's writer.
pub(crate) struct LogWriter(Arc<Shared>);

/// The writing thread; [`Self::stop`] writes out what is gathered and
/// ends it.
pub(crate) struct Flusher {
    shared: Arc<Shared>,
    thread: JoinHandle<()>,
}

/// Start the writing thread. If it cannot be started, the lines are
/// written by the calls that log them.
pub(crate) fn start() -> (LogWriter, Option<Flusher>) {
    let shared = Arc::new(Shared::default());
    let for_thread = Arc::clone(&shared);
    match std::thread::Builder::new().name("log-writer".into()).spawn(move || write_lines(&for_thread)) {
        Ok(thread) => (LogWriter(Arc::clone(&shared)), Some(Flusher { shared, thread })),
        Err(_) => {
            shared.lock().finished = true;
            (LogWriter(shared), None)
        }
    }
}

impl Flusher {
    /// Write out the gathered lines and end the thread, waiting at most
    /// `STOP_WAIT`; later lines are written by the calls that log them.
    pub(crate) fn stop(self) {
        let shared = &*self.shared;
        shared.lock().stopped = true;
        shared.ready.notify_one();
        let deadline = Instant::now() + STOP_WAIT;
        let mut gathered = shared.lock();
        while !gathered.finished {
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else { break };
            gathered = shared.room.wait_timeout(gathered, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        let finished = gathered.finished;
        drop(gathered);
        if finished {
            // A panic in the thread has nothing left to report.
            let _ = self.thread.join();
        }
    }
}

fn write_lines(shared: &Shared) {
    let mut batch = Vec::new();
    loop {
        let mut gathered = shared.lock();
        while gathered.bytes.is_empty() && !gathered.stopped {
            gathered = shared.ready.wait(gathered).unwrap_or_else(PoisonError::into_inner);
        }
        if gathered.bytes.is_empty() {
            // Stopped, and every line gathered before is written.
            gathered.finished = true;
            drop(gathered);
            shared.room.notify_all();
            return;
        }
        let deadline = Instant::now() + WRITE_EVERY;
        while !gathered.stopped && gathered.bytes.len() < WRITE_AT {
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else { break };
            gathered = shared.ready.wait_timeout(gathered, left).unwrap_or_else(PoisonError::into_inner).0;
        }
        std::mem::swap(&mut gathered.bytes, &mut batch);
        drop(gathered);
        shared.room.notify_all();
        write_out(&batch);
        batch.clear();
        // What a stalled reader made gathered is not kept.
        batch.shrink_to(WRITE_AT);
    }
}

/// Write to stdout. A failed write has nowhere to be reported: the lines
/// are lost, as they would be by any logger.
fn write_out(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(bytes).and_then(|()| stdout.flush());
}

/// One line's write.
pub(crate) struct Line<'a>(&'a Shared);

impl std::io::Write for Line<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let shared = self.0;
        let mut gathered = shared.lock();
        while gathered.bytes.len() >= MAX_GATHERED && !gathered.finished {
            gathered = shared.room.wait(gathered).unwrap_or_else(PoisonError::into_inner);
        }
        if gathered.finished {
            drop(gathered);
            write_out(line);
            return Ok(line.len());
        }
        let first = gathered.bytes.is_empty();
        gathered.bytes.extend_from_slice(line);
        let full = gathered.bytes.len() >= WRITE_AT;
        drop(gathered);
        if first || full {
            shared.ready.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(&self.0)
    }
}
