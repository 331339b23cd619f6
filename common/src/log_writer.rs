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

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

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

/// Where the lines go: stdout, or a test's buffer.
pub(crate) type Output = Box<dyn std::io::Write + Send>;

struct Shared {
    gathered: Mutex<Gathered>,
    /// Lines to write: the first of a batch, `WRITE_AT` bytes, or the stop.
    ready: Condvar,
    /// The thread took what was gathered.
    room: Condvar,
    out: Mutex<Output>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Gathered> {
        // Nothing panics while holding the lock; a poisoned one is as good.
        self.gathered.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A failed write has nowhere to be reported: the lines are lost, as
    /// they would be by any logger.
    fn write_out(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = out.write_all(bytes).and_then(|()| out.flush());
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
pub(crate) fn start(out: Output) -> (LogWriter, Option<Flusher>) {
    let shared = Arc::new(Shared {
        gathered: Mutex::default(),
        ready: Condvar::new(),
        room: Condvar::new(),
        out: Mutex::new(out),
    });
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
        let finished = shared
            .room
            .wait_timeout_while(shared.lock(), STOP_WAIT, |g| !g.finished)
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .finished;
        if finished {
            // A panic in the thread has nothing left to report.
            let _ = self.thread.join();
        }
    }
}

fn write_lines(shared: &Shared) {
    let mut batch = Vec::new();
    loop {
        let mut gathered = shared
            .ready
            .wait_while(shared.lock(), |g| g.bytes.is_empty() && !g.stopped)
            .unwrap_or_else(PoisonError::into_inner);
        if gathered.bytes.is_empty() {
            // Stopped, and every line gathered before is written.
            gathered.finished = true;
            drop(gathered);
            shared.room.notify_all();
            return;
        }
        gathered = shared
            .ready
            .wait_timeout_while(gathered, WRITE_EVERY, |g| !g.stopped && g.bytes.len() < WRITE_AT)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
        std::mem::swap(&mut gathered.bytes, &mut batch);
        drop(gathered);
        shared.room.notify_all();
        shared.write_out(&batch);
        batch.clear();
        // What a stalled reader made gathered is not kept.
        batch.shrink_to(WRITE_AT);
    }
}

/// One line's write.
pub(crate) struct Line<'a>(&'a Shared);

impl std::io::Write for Line<'_> {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let shared = self.0;
        let mut gathered = shared
            .room
            .wait_while(shared.lock(), |g| g.bytes.len() >= MAX_GATHERED && !g.finished)
            .unwrap_or_else(PoisonError::into_inner);
        if gathered.finished {
            drop(gathered);
            shared.write_out(line);
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

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::sync::mpsc;

    use super::*;

    /// Keeps every write it is given, as it was given.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl std::io::Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log(writer: &LogWriter, line: &str) {
        writer.make_writer().write_all(line.as_bytes()).expect("a line is always taken");
    }

    #[test]
    fn lines_logged_together_reach_the_output_in_order_in_a_few_writes() {
        let writes = Writes::default();
        let (writer, flusher) = start(Box::new(writes.clone()));
        // As a stage logs: lines a little apart (here 100 µs or more), each
        // of which would find the thread asleep.
        let lines: Vec<String> = (0..200).map(|i| format!("{{\"n\":{i}}}\n")).collect();
        for line in &lines {
            log(&writer, line);
            std::thread::sleep(Duration::from_micros(100));
        }
        flusher.expect("a writing thread").stop();
        // After the stop, a line goes out at once.
        log(&writer, "after\n");

        let writes = writes.0.lock().expect("writes").clone();
        let all: Vec<u8> = writes.concat();
        assert_eq!(String::from_utf8(all).expect("UTF-8"), lines.concat() + "after\n");
        // Not one write per line: the thread writes what gathered meanwhile.
        assert!(writes.len() <= 10, "{} writes for 201 lines", writes.len());
    }

    /// An output that never takes a line: a log reader that has stopped.
    struct Stalled;

    impl std::io::Write for Stalled {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            loop {
                std::thread::park();
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_stop_waits_for_a_stalled_output_no_longer_than_its_bound() {
        let (writer, flusher) = start(Box::new(Stalled));
        log(&writer, "never read\n");
        let (done, stopped) = mpsc::channel();
        let started = std::time::Instant::now();
        std::thread::spawn(move || {
            flusher.expect("a writing thread").stop();
            let _ = done.send(());
        });
        stopped.recv_timeout(Duration::from_secs(10)).expect("the stop returns within 10 s");
        assert!(started.elapsed() >= STOP_WAIT, "{:?}", started.elapsed());
    }
}
