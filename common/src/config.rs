//! Typed configuration read from a [`Source`] (the process environment and
//! `.env` in production, a map in tests).
//!
//! A binary's configuration is built by one function that reads every
//! variable through a [`Reader`]. The reader collects every problem instead
//! of stopping at the first, so an operator fixes them all in one go, and
//! names the variables but never prints their values (they may be secrets).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

/// The exit code for a configuration error (`EX_CONFIG` is 78, but 64,
/// `EX_USAGE`, is what operators and our scripts expect).
pub const EXIT_CONFIG: i32 = 64;

/// Where configuration values come from.
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment, then a `.env` file in the working directory.
/// A variable set in the environment wins over the file.
#[derive(Debug, Default)]
pub struct Env {
    dotenv: HashMap<String, String>,
}

impl Env {
    /// Read `.env` if present. A malformed `.env` is reported as a
    /// configuration error by [`Env::load_checked`].
    pub fn load() -> Self {
        Self::load_checked().unwrap_or_default()
    }

    pub fn load_checked() -> Result<Self, ConfigErrors> {
        let mut dotenv = HashMap::new();
        match dotenvy::from_filename_iter(".env") {
            Ok(iter) => {
                for item in iter {
                    match item {
                        Ok((k, v)) => {
                            dotenv.insert(k, v);
                        }
                        Err(_) => {
                            return Err(ConfigErrors(vec![ConfigError {
                                name: ".env".into(),
                                reason: "the file is not valid dotenv syntax".into(),
                            }]));
                        }
                    }
                }
            }
            Err(e) if e.not_found() => {}
            Err(_) => {
                return Err(ConfigErrors(vec![ConfigError {
                    name: ".env".into(),
                    reason: "the file exists but could not be read".into(),
                }]));
            }
        }
        Ok(Self { dotenv })
    }
}

impl Source for Env {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().or_else(|| self.dotenv.get(name).cloned())
    }
}

/// A fixed set of variables, for tests.
#[derive(Debug, Default, Clone)]
pub struct Map(pub HashMap<String, String>);

impl Map {
    pub fn new<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        Map(pairs.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }

    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.0.insert(name.into(), value.into());
        self
    }
}

impl Source for Map {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// One invalid or missing variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub name: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}

/// Every problem found in one read of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.name.as_str()).collect()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// Reads variables and collects every problem.
pub struct Reader<'a> {
    source: &'a dyn Source,
    errors: Vec<ConfigError>,
}

impl<'a> Reader<'a> {
    pub fn new(source: &'a dyn Source) -> Self {
        Self { source, errors: Vec::new() }
    }

    /// Record a problem found by a cross-variable rule.
    pub fn error(&mut self, name: &str, reason: impl Into<String>) {
        self.errors.push(ConfigError { name: name.into(), reason: reason.into() });
    }

    /// The raw value, `None` when unset or empty.
    pub fn raw(&self, name: &str) -> Option<String> {
        self.source.get(name).filter(|v| !v.trim().is_empty())
    }

    /// A required non-empty string.
    pub fn required(&mut self, name: &str) -> String {
        match self.raw(name) {
            Some(v) => v,
            None => {
                self.error(name, "required but not set");
                String::new()
            }
        }
    }

    /// A required secret; never printed.
    pub fn secret(&mut self, name: &str) -> SecretString {
        SecretString::from(self.required(name))
    }

    /// An optional secret; never printed.
    pub fn optional_secret(&mut self, name: &str) -> Option<SecretString> {
        self.raw(name).map(SecretString::from)
    }

    /// An optional string with a default.
    pub fn string_or(&mut self, name: &str, default: &str) -> String {
        self.raw(name).unwrap_or_else(|| default.to_owned())
    }

    /// A value parsed with `FromStr`, or the default when unset.
    pub fn parse_or<T>(&mut self, name: &str, default: T) -> T
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.raw(name) {
            None => default,
            Some(v) => match v.trim().parse() {
                Ok(parsed) => parsed,
                Err(e) => {
                    // The parse error of a well-behaved FromStr describes the
                    // expected form, not the value; we still never print the value.
                    self.error(name, format!("invalid value ({e})"));
                    default
                }
            },
        }
    }

    /// An integer within an inclusive range, or the default when unset.
    pub fn ranged<T>(&mut self, name: &str, default: T, range: std::ops::RangeInclusive<T>) -> T
    where
        T: FromStr + PartialOrd + Copy + fmt::Display,
        T::Err: fmt::Display,
    {
        let v = self.parse_or(name, default);
        if range.contains(&v) {
            v
        } else {
            self.error(name, format!("must be between {} and {}", range.start(), range.end()));
            default
        }
    }

    /// Whole seconds within a range, as a `Duration`.
    pub fn seconds(&mut self, name: &str, default: u64, range: std::ops::RangeInclusive<u64>) -> Duration {
        Duration::from_secs(self.ranged(name, default, range))
    }

    /// A socket address such as `0.0.0.0:9101`.
    pub fn addr(&mut self, name: &str, default: &str) -> SocketAddr {
        let fallback = SocketAddr::from(([0, 0, 0, 0], 0));
        match self.raw(name).as_deref().unwrap_or(default).parse() {
            Ok(a) => a,
            Err(_) => {
                self.error(name, "must be an address such as 0.0.0.0:8000");
                fallback
            }
        }
    }

    /// A comma-separated list, empty items dropped.
    pub fn list(&mut self, name: &str) -> Vec<String> {
        self.raw(name)
            .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
            .unwrap_or_default()
    }

    /// Finish reading: the value if every variable was valid, else every
    /// problem at once.
    pub fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() { Ok(value) } else { Err(ConfigErrors(self.errors)) }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

impl FromStr for LogFormat {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" | "text" | "pretty" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected human or json"),
        }
    }
}

/// Settings every stage shares: telemetry, and the threads of the runtime
/// that `telemetry::run_logged` builds.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub metrics_addr: SocketAddr,
    pub log_format: LogFormat,
    pub log_filter: String,
    /// `TOKIO_WORKER_THREADS`, read here like every other variable (so a
    /// `.env` file sets it too, and a bad value is a configuration error);
    /// `None`: one worker per core.
    pub worker_threads: Option<usize>,
}

impl TelemetryConfig {
    pub fn read(r: &mut Reader<'_>, default_metrics_addr: &str) -> Self {
        Self {
            metrics_addr: r.addr("METRICS_ADDR", default_metrics_addr),
            log_format: r.parse_or("LOG_FORMAT", LogFormat::Human),
            log_filter: r.string_or("RUST_LOG", "info"),
            worker_threads: r
                .raw("TOKIO_WORKER_THREADS")
                .is_some()
                .then(|| r.ranged("TOKIO_WORKER_THREADS", 1, 1..=1024)),
        }
    }
}

/// Postgres settings of the stages that write to the database.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    pub url: SecretString,
    pub timeout: Duration,
    pub pool_size: usize,
    /// CA certificates (PEM) to verify the server with (`DATABASE_CA_FILE`).
    pub ca_file: Option<std::path::PathBuf>,
    /// Apply migrations at start (`DATABASE_MIGRATE_ON_START`).
    pub migrate_on_start: bool,
}

impl DatabaseConfig {
    /// How the write path's statements are sent: named unless the URL
    /// names a transaction-mode pooler.
    pub fn statements(&self) -> crate::db::Statements {
        use secrecy::ExposeSecret;
        crate::db::Statements::for_url(self.url.expose_secret())
    }

    pub fn read(r: &mut Reader<'_>) -> Self {
        let url = r.secret("DATABASE_URL");
        {
            use secrecy::ExposeSecret;
            let u = url.expose_secret();
            if !(u.is_empty() || u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                r.error("DATABASE_URL", "must be a postgres:// or postgresql:// URL");
            }
        }
        let ca_file = r.raw("DATABASE_CA_FILE").map(std::path::PathBuf::from);
        if let Some(f) = &ca_file
            && !f.is_file()
        {
            r.error("DATABASE_CA_FILE", "must be a readable PEM file");
        }
        Self {
            url,
            timeout: r.seconds("DATABASE_TIMEOUT_SECS", 30, 10..=60),
            pool_size: r.ranged("DATABASE_POOL_SIZE", 8, 1..=100),
            ca_file,
            migrate_on_start: r.parse_or("DATABASE_MIGRATE_ON_START", true),
        }
    }

    /// Batches of the group commit written at once: one. The requests
    /// that arrive while a batch is written gather for the next one, so
    /// a second writer only halves the batches: on the bench (2 cores)
    /// one writer made batches of 16 to 24 rows instead of 10 to 11 and
    /// cut Postgres' CPU per message by a third (0.78 → 0.52 ms). The
    /// rest of the pool serves reads (status, readiness) and the
    /// one-by-one retries of a failed batch.
    pub fn batch_workers(&self) -> usize {
        1
    }
}

/// The most messages one group-commit statement writes.
pub const MAX_BATCH: usize = 128;

/// The optional Redis settings (`REDIS_URL` unset = no Redis).
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: Option<SecretString>,
}

impl RedisConfig {
    pub fn read(r: &mut Reader<'_>) -> Self {
        let url = r.optional_secret("REDIS_URL");
        if let Some(u) = &url {
            use secrecy::ExposeSecret;
            if !u.expose_secret().starts_with("redis://") {
                r.error("REDIS_URL", "must be a redis:// URL (TLS rediss:// is not supported by this build)");
            }
        }
        Self { url }
    }
}

/// Read a configuration, or print every problem and exit 64.
///
/// Call this first in `main`, before binding any port.
pub fn load_or_exit<T>(read: impl FnOnce(&mut Reader<'_>) -> T) -> T {
    let env = match Env::load_checked() {
        Ok(env) => env,
        Err(errors) => exit_with(&errors),
    };
    let mut reader = Reader::new(&env);
    let value = read(&mut reader);
    match reader.finish(value) {
        Ok(v) => v,
        Err(errors) => exit_with(&errors),
    }
}

fn exit_with(errors: &ConfigErrors) -> ! {
    eprint!("{errors}");
    std::process::exit(EXIT_CONFIG)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn the_runtimes_worker_threads_are_read_like_every_other_variable() {
        let threads = |value: Option<&str>| {
            let src = Map::new(value.map(|v| ("TOKIO_WORKER_THREADS", v)));
            let mut r = Reader::new(&src);
            let c = TelemetryConfig::read(&mut r, "0.0.0.0:9101");
            r.finish(c.worker_threads).map_err(|e| e.names().join(","))
        };
        assert_eq!(threads(None), Ok(None));
        assert_eq!(threads(Some("1")), Ok(Some(1)));
        assert_eq!(threads(Some("0")), Err("TOKIO_WORKER_THREADS".into()));
        assert_eq!(threads(Some("two")), Err("TOKIO_WORKER_THREADS".into()));
    }

    #[test]
    fn every_problem_is_reported_at_once_by_name_without_values() {
        let src = Map::new([("DATABASE_TIMEOUT_SECS", "999"), ("METRICS_ADDR", "s3cr3t-not-an-addr")]);
        let mut r = Reader::new(&src);
        let _ = DatabaseConfig::read(&mut r);
        let _ = TelemetryConfig::read(&mut r, "0.0.0.0:9101");
        let errors = r.finish(()).expect_err("invalid");
        assert_eq!(errors.names(), vec!["DATABASE_URL", "DATABASE_TIMEOUT_SECS", "METRICS_ADDR"]);
        assert!(!errors.to_string().contains("s3cr3t"), "a value leaked: {errors}");
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let src = Map::new([("DATABASE_URL", "postgres://u:hunter2-password@db/x")]);
        let mut r = Reader::new(&src);
        let db = DatabaseConfig::read(&mut r);
        let db = r.finish(db).expect("valid");
        assert!(!format!("{db:?}").contains("hunter2"));
        assert!(db.url.expose_secret().contains("hunter2"));
    }

    #[test]
    fn lists_drop_blank_items_and_defaults_apply() {
        let src = Map::new([("L", " a, ,b ,")]);
        let mut r = Reader::new(&src);
        assert_eq!(r.list("L"), vec!["a", "b"]);
        assert_eq!(r.ranged("N", 5u32, 1..=10), 5);
        assert!(r.finish(()).is_ok());
    }
}
