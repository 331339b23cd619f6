//! Logging initialisation.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryConfig};

/// The log writer's thread, while it runs.
static WRITER: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> = std::sync::Mutex::new(None);

/// Write out the queued lines and stop the log writer, at a stage's exit
/// (later lines are not written).
pub fn finish() {
    let guard = WRITER.lock().ok().and_then(|mut writer| writer.take());
    drop(guard);
}

/// Lines queued for the writer before a logging call waits for room.
/// (Its channel's slots are allocated at start: about 32 bytes each.)
const QUEUED_LINES: usize = 16 * 1024;

/// Install the global tracing subscriber: human-readable or JSON lines on
/// stdout, filtered by `RUST_LOG`. Safe to call more than once (tests run
/// several stages in one process); only the first call installs.
///
/// The lines are written by a thread of their own, which writes whatever
/// has queued in one go: a handler never waits for the write (a pipe to a
/// slow log collector would otherwise stall the runtime's workers) unless
/// `QUEUED_LINES` are waiting, and no line is dropped.
pub fn init_tracing(config: &TelemetryConfig) {
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout()));
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_target(true).with_ansi(ansi).with_writer(writer);
    let installed = match config.log_format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
    if installed.is_ok()
        && let Ok(mut writer) = WRITER.lock()
    {
        *writer = Some(guard);
    }
}

/// A stage's `main`: the logs installed first, the runtime built, `main`
/// run on it, and the logs written out last, once the runtime has stopped
/// every task (so the lines of tasks ended by the shutdown are kept too),
/// whether `main` returns or panics.
pub fn run_logged<F: std::future::Future>(config: &TelemetryConfig, main: F) -> std::io::Result<F::Output> {
    struct Finish;
    impl Drop for Finish {
        fn drop(&mut self) {
            finish();
        }
    }
    init_tracing(config);
    let _finish = Finish;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    Ok(runtime.block_on(main))
}
