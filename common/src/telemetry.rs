//! Logging initialisation.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryConfig};
use crate::log_json::{JsonLines, JsonMembers};
use crate::log_writer;

/// The log writer's thread, while it runs.
static WRITER: std::sync::Mutex<Option<log_writer::Flusher>> = std::sync::Mutex::new(None);

/// Write out the gathered lines and stop the log writer, at a stage's
/// exit (later lines are written by the calls that log them).
pub fn finish() {
    let flusher = WRITER.lock().ok().and_then(|mut writer| writer.take());
    if let Some(flusher) = flusher {
        flusher.stop();
    }
}

/// Install the global tracing subscriber: human-readable or JSON lines on
/// stdout (JSON in the shape of `tracing-subscriber`'s own, written by
/// [`crate::log_json`]), filtered by `RUST_LOG`. Safe to call more than
/// once (tests run several stages in one process); only the first call
/// installs.
///
/// The lines are written by a thread of their own ([`crate::log_writer`]):
/// a handler never waits for the write unless a reader has fallen
/// megabytes behind, and no line is dropped (at exit, it waits for a
/// stalled reader at most 2 s).
pub fn init_tracing(config: &TelemetryConfig) {
    let filter = EnvFilter::try_new(&config.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (writer, flusher) = log_writer::start(Box::new(std::io::stdout()));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true).with_writer(writer);
    let installed = match config.log_format {
        LogFormat::Human => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => {
            builder.with_ansi(false).fmt_fields(JsonMembers).event_format(JsonLines::default()).try_init()
        }
    };
    if installed.is_ok()
        && let Ok(mut writer) = WRITER.lock()
    {
        *writer = flusher;
    } else if let Some(flusher) = flusher {
        flusher.stop();
    }
}

/// A stage's `main`: the logs installed first, the runtime built, `main`
/// run on it, and the logs written out last, once the runtime has stopped
/// every task (so the lines of tasks ended by the shutdown are kept too),
/// whether `main` returns or panics.
pub fn run_logged<F>(config: &TelemetryConfig, main: F) -> std::io::Result<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    struct Finish;
    impl Drop for Finish {
        fn drop(&mut self) {
            finish();
        }
    }
    init_tracing(config);
    let _finish = Finish;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = config.worker_threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime.enable_all().build()?;
    // `main` runs as a task on the runtime's workers, not on this thread:
    // the stage's fetch loop, the handlers it spawns and the connections'
    // tasks then wake one another within the workers. Polled by
    // `block_on` here, every message handed the loop from a worker to
    // this thread and back (futex wake-ups: 4 per message in ingest at
    // 500 msg/s).
    match runtime.block_on(runtime.spawn(main)) {
        Ok(output) => Ok(output),
        Err(error) => match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(error) => Err(std::io::Error::other(error)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TelemetryConfig {
        TelemetryConfig {
            metrics_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            log_format: LogFormat::Json,
            log_filter: "warn".into(),
            worker_threads: None,
        }
    }

    #[test]
    fn a_stages_main_runs_on_the_runtimes_workers_and_its_panic_reaches_the_caller() {
        // Not on the calling thread: there, every message would cross
        // between it and the workers.
        let caller = std::thread::current().id();
        let ran_on = run_logged(&config(), async { std::thread::current().id() }).expect("a runtime");
        assert_ne!(ran_on, caller);
        let panicked = std::panic::catch_unwind(|| run_logged(&config(), async { panic!("the stage's own panic") }));
        let payload = panicked.expect_err("the panic goes on to the caller");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"the stage's own panic"));
    }

    #[test]
    fn the_runtime_has_the_configured_worker_threads() {
        let one = TelemetryConfig { worker_threads: Some(1), ..config() };
        let workers = run_logged(&one, async { tokio::runtime::Handle::current().metrics().num_workers() });
        assert_eq!(workers.expect("a runtime"), 1);
        let three = TelemetryConfig { worker_threads: Some(3), ..config() };
        let workers = run_logged(&three, async { tokio::runtime::Handle::current().metrics().num_workers() });
        assert_eq!(workers.expect("a runtime"), 3);
    }
}
