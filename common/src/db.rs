//! Postgres access shared by the stages that write to the database:
//! the connection pool and the embedded, append-only migrations.

use std::sync::Arc;

pub use deadpool_postgres::Pool;
use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use rustls::{DigitallySignedStruct, SignatureScheme};
use secrecy::ExposeSecret;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::DatabaseConfig;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Why the database could not be reached or prepared.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid Postgres URL")]
    InvalidUrl(#[source] tokio_postgres::Error),
    #[error("could not build the connection pool")]
    Build(#[from] deadpool_postgres::BuildError),
    #[error("could not get a database connection")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("migration failed")]
    Migration(#[from] refinery::Error),
    #[error("could not set up TLS to Postgres: {0}")]
    Tls(String),
    #[error(transparent)]
    Stopped(#[from] crate::batch::Stopped),
    /// The statement of a whole batch could not reach the database.
    #[error("the database is unreachable: {0}")]
    Unreachable(String),
}

impl DbError {
    /// True when the database could not be reached at all (connection
    /// refused or lost, pool timeout), as opposed to a statement it refused.
    pub fn is_unreachable(&self) -> bool {
        match self {
            DbError::Pool(_) | DbError::Unreachable(_) => true,
            DbError::Postgres(e) => e.is_closed() || e.code().is_none(),
            _ => false,
        }
    }

    /// The stage error for a failed database step: an unreachable database
    /// pauses the stage (nothing is dead-lettered because Postgres is down,
    /// no delivery is spent); anything else is a transient error.
    pub fn into_stage_error(self, what: &str) -> crate::StageError {
        if self.is_unreachable() {
            crate::StageError::paused(
                format!("the database is unreachable ({what}): {}", crate::error::chain(&self)),
                std::time::Duration::from_secs(2),
            )
        } else {
            crate::StageError::transient(format!("could not {what}")).with_source(self)
        }
    }
}

/// How the connection is protected, as the URL's `sslmode` asks (libpq's
/// meaning): `disable` none; `prefer` (the default) and `require` encrypt
/// without checking the server's certificate; `verify-ca` and
/// `verify-full` check it, against `DATABASE_CA_FILE` when set, else the
/// system's roots. A `DATABASE_CA_FILE` makes every TLS mode verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Off,
    Encrypt,
    Verify,
}

/// The URL tokio-postgres understands (it knows `disable`, `prefer` and
/// `require`) and the TLS mode asked for.
pub fn tls_mode(url: &str) -> (String, TlsMode) {
    let Some((base, query)) = url.split_once('?') else { return (url.to_owned(), TlsMode::Encrypt) };
    let mut mode = TlsMode::Encrypt;
    let params: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some(("sslmode", "verify-ca" | "verify-full")) => {
                mode = TlsMode::Verify;
                "sslmode=require".to_owned()
            }
            Some(("sslmode", "disable")) => {
                mode = TlsMode::Off;
                kv.to_owned()
            }
            _ => kv.to_owned(),
        })
        .collect();
    (format!("{base}?{}", params.join("&")), mode)
}

/// Accepts any server certificate but still checks the handshake
/// signatures: libpq's `sslmode=require` (encrypted, not authenticated).
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_connector(mode: TlsMode, ca_file: Option<&std::path::Path>) -> Result<MakeRustlsConnect, DbError> {
    crate::install_crypto_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| DbError::Tls(e.to_string()))?;
    let config = match (mode, ca_file) {
        (_, Some(path)) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| DbError::Tls(format!("DATABASE_CA_FILE cannot be read: {e}")))?;
            for cert in certs {
                let cert = cert.map_err(|e| DbError::Tls(format!("DATABASE_CA_FILE is not PEM: {e}")))?;
                roots.add(cert).map_err(|e| DbError::Tls(format!("DATABASE_CA_FILE holds a bad certificate: {e}")))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (TlsMode::Verify, None) => {
            let verifier =
                rustls_platform_verifier::Verifier::new(provider).map_err(|e| DbError::Tls(e.to_string()))?;
            builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
        }
        _ => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(EncryptOnly(provider))).with_no_client_auth()
        }
    };
    Ok(MakeRustlsConnect::new(config))
}

/// True for a transaction-mode pooler: Supabase's port 6543, or a URL
/// marked `pgbouncer=true` (the convention Supabase's and Prisma's URLs
/// use). There every statement of the stages is unnamed
/// ([`Statements::Unnamed`]), so they work unchanged.
pub fn behind_transaction_pooler(url: &str) -> bool {
    let authority = url.split("://").nth(1).unwrap_or("").split(['/', '?']).next().unwrap_or("");
    let port = authority.rsplit_once(':').map(|(_, p)| p).unwrap_or("");
    port == "6543" || url.contains("pgbouncer=true")
}

/// How the write path's statements (a claim, an upsert: the ones run for
/// every message) reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statements {
    /// Prepared once per connection and kept (named, in the pool's
    /// statement cache): the server parses and plans them once, not at
    /// every batch.
    Named,
    /// Sent unnamed every time: the only kind a transaction-mode pooler
    /// passes, as it cannot keep a statement between transactions.
    Unnamed,
}

impl Statements {
    /// Unnamed behind a transaction-mode pooler, named otherwise.
    pub fn for_url(url: &str) -> Self {
        if behind_transaction_pooler(url) { Statements::Unnamed } else { Statements::Named }
    }
}

/// Sent at the start of a transaction of the write path (ingest's claim,
/// the upsert's rows and links): its named statements run on generic plans,
/// planned once per connection instead of at every batch (planning was
/// 0.4 to 0.8 ms per statement and batch, as much as running it), and those
/// plans look every row up by key, whatever the tables' size when they
/// were made: with sequential scans, hash and merge joins and
/// materialisation off, a plan made while a table was empty cannot scan it
/// whole once it has grown (what a generic plan did before
/// `force_custom_plan`). `SET LOCAL`: every other statement keeps the
/// connection's settings. Behind a transaction pooler the statements are
/// unnamed, planned at each run anyway, and the settings are harmless.
pub const WRITE_SETTINGS: &str = "SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off; \
     SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; SET LOCAL enable_material = off";

/// A statement's parameters, each with its type.
pub type Binds<'a> = [(&'a (dyn tokio_postgres::types::ToSql + Sync), tokio_postgres::types::Type)];

/// A pooled connection or a transaction on one: what [`query`] runs on.
pub trait Connection: deadpool_postgres::GenericClient {
    /// The underlying client, for unnamed statements.
    type Plain: tokio_postgres::GenericClient;
    fn plain(&self) -> &Self::Plain;
}

impl Connection for deadpool_postgres::Client {
    type Plain = tokio_postgres::Client;
    fn plain(&self) -> &tokio_postgres::Client {
        self
    }
}

impl<'a> Connection for deadpool_postgres::Transaction<'a> {
    type Plain = tokio_postgres::Transaction<'a>;
    fn plain(&self) -> &tokio_postgres::Transaction<'a> {
        self
    }
}

/// A write-path statement ready to run: prepared on the connection (named)
/// or the text sent with every run (unnamed).
pub enum Prepared<'s> {
    Named(tokio_postgres::Statement),
    Unnamed(&'s str),
}

/// Prepare `sql` for `binds`' types as `how` says (for named statements,
/// once per connection: later calls hit the pool's statement cache).
/// Statements pipelined on one connection run in the order their first
/// poll sends them: prepare them all first, then run them.
pub async fn prepare<'s, C: Connection>(
    client: &C,
    how: Statements,
    sql: &'s str,
    binds: &Binds<'_>,
) -> Result<Prepared<'s>, tokio_postgres::Error> {
    match how {
        Statements::Unnamed => Ok(Prepared::Unnamed(sql)),
        Statements::Named => {
            let types: Vec<tokio_postgres::types::Type> = binds.iter().map(|(_, t)| t.clone()).collect();
            Ok(Prepared::Named(client.prepare_typed_cached(sql, &types).await?))
        }
    }
}

/// Run a prepared statement with `binds` and return its rows. Sends the
/// statement at its first poll, with no round trip before.
pub async fn run<C: Connection>(
    client: &C,
    statement: &Prepared<'_>,
    binds: &Binds<'_>,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    match statement {
        Prepared::Unnamed(sql) => tokio_postgres::GenericClient::query_typed(client.plain(), sql, binds).await,
        Prepared::Named(statement) => {
            let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = binds.iter().map(|(v, _)| *v).collect();
            deadpool_postgres::GenericClient::query(client, statement, &params).await
        }
    }
}

/// Run one write-path statement (`sql` with `binds`), named or unnamed as
/// `how` says, as a write transaction of its own ([`write_transaction`]:
/// one round trip, and on a direct connection its generic plan), and
/// return its rows.
pub async fn write_statement<C: Connection>(
    client: &C,
    how: Statements,
    sql: &str,
    binds: &Binds<'_>,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let statement = prepare(client, how, sql, binds).await?;
    write_transaction(client, run(client, &statement, binds)).await
}

/// Run `work` (statements on `client`, each sending itself at its first
/// poll) as one write-path transaction in one round trip: `BEGIN` with
/// [`WRITE_SETTINGS`], then `work`'s statements, then `COMMIT`, sent in that
/// order before any answer comes back.
///
/// Every part is polled until it answers (`join!`, not `try_join!`): a
/// statement whose error came back before the next part was first polled
/// (a busy thread, a fast refusal) must not stop the `COMMIT` from being
/// sent, and the connection goes back to the pool only once Postgres has
/// answered all of it, outside any transaction. If a statement fails in
/// Postgres, Postgres answers the `COMMIT` with a rollback: nothing is kept.
/// If `work` fails in the client before the end is sent (a statement that
/// could not be encoded, so never reached Postgres, while others did), the
/// end is a `ROLLBACK`: what was sent is not kept either.
pub async fn write_transaction<C: Connection, T>(
    client: &C,
    work: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    use tokio_postgres::GenericClient as _;
    let plain = client.plain();
    let refused_here = std::sync::atomic::AtomicBool::new(false);
    let work = async {
        let out = work.await;
        if out.as_ref().is_err_and(|e| e.as_db_error().is_none()) {
            refused_here.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        out
    };
    // Polled after `work` in the same poll (biased): it sees a failure of
    // `work`'s first poll.
    let end = async {
        let refused = refused_here.load(std::sync::atomic::Ordering::Relaxed);
        plain.batch_execute(if refused { "ROLLBACK" } else { "COMMIT" }).await
    };
    let (begin, settings, out, end) =
        tokio::join!(biased; plain.batch_execute("BEGIN"), plain.batch_execute(WRITE_SETTINGS), work, end);
    // The first error in the order sent: a statement's own error comes
    // before the aborted transaction's errors that follow it.
    begin?;
    settings?;
    let out = out?;
    end?;
    Ok(out)
}

fn without_param(url: &str, name: &str) -> String {
    let Some((base, query)) = url.split_once('?') else { return url.to_owned() };
    let kept: Vec<&str> = query.split('&').filter(|kv| kv.split('=').next() != Some(name)).collect();
    if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) }
}

/// The `halakhot` columns of submitted texts, one array per column, for a
/// multi-row statement (`unnest($1::text[], ...)`).
#[derive(Default)]
pub struct HalakhaColumns<'a> {
    pub ids: Vec<&'a str>,
    pub contents: Vec<&'a str>,
    pub sources: Vec<Option<&'a str>>,
    pub langs: Vec<Option<&'a str>>,
    pub days: Vec<i32>,
    pub received: Vec<time::OffsetDateTime>,
    pub dates: Vec<time::Date>,
    pub images: Vec<Option<&'a str>>,
}

impl<'a> HalakhaColumns<'a> {
    /// From `(id, halakha)` pairs, in order.
    pub fn new(items: impl Iterator<Item = (&'a str, &'a crate::Halakha)>) -> Self {
        let mut c = Self::default();
        for (id, h) in items {
            c.ids.push(id);
            c.contents.push(h.content.as_str());
            c.sources.push(h.source.as_deref());
            c.langs.push(h.lang.map(|l| l.as_str()));
            c.days.push(i32::from(h.schedule_days));
            c.received.push(h.received_at);
            c.dates.push(h.date_post());
            c.images.push(h.image_url.as_deref());
        }
        c
    }

    /// The columns as the first eight parameters of a statement, in the
    /// order above: `$1::text[]` (ids) to `$8::text[]` (image URLs).
    pub fn binds(&self) -> Vec<(&(dyn tokio_postgres::types::ToSql + Sync), tokio_postgres::types::Type)> {
        use tokio_postgres::types::Type;
        vec![
            (&self.ids, Type::TEXT_ARRAY),
            (&self.contents, Type::TEXT_ARRAY),
            (&self.sources, Type::TEXT_ARRAY),
            (&self.langs, Type::TEXT_ARRAY),
            (&self.days, Type::INT4_ARRAY),
            (&self.received, Type::TIMESTAMPTZ_ARRAY),
            (&self.dates, Type::DATE_ARRAY),
            (&self.images, Type::TEXT_ARRAY),
        ]
    }
}

/// One kind of write done as a group commit ([`crate::batch`]): `many`
/// writes the requests waiting together in one statement, `one` writes a
/// single request (to tell which request of a failed batch is at fault).
/// Each takes its requests by value and hands them back with the answers.
pub struct GroupCommit<T, R> {
    batcher: crate::batch::Batcher<T, (T, Result<R, DbError>)>,
}

impl<T, R> Clone for GroupCommit<T, R> {
    fn clone(&self) -> Self {
        Self { batcher: self.batcher.clone() }
    }
}

impl<T: Send + 'static, R: Send + 'static> GroupCommit<T, R> {
    /// Start the writers: [`DatabaseConfig::batch_workers`] of them, with
    /// batches of at most [`crate::config::MAX_BATCH`].
    pub fn new<M, MF, O, OF>(pool: Pool, config: &DatabaseConfig, many: M, one: O) -> Self
    where
        M: Fn(Pool, Vec<T>) -> MF + Send + Sync + 'static,
        MF: std::future::Future<Output = (Vec<T>, Result<Vec<R>, DbError>)> + Send + 'static,
        O: Fn(Pool, T) -> OF + Send + Sync + 'static,
        OF: std::future::Future<Output = (T, Result<R, DbError>)> + Send + 'static,
    {
        let (many, one) = (Arc::new(many), Arc::new(one));
        let batcher =
            crate::batch::Batcher::spawn(config.batch_workers(), crate::config::MAX_BATCH, move |items: Vec<T>| {
                let (pool, many, one) = (pool.clone(), many.clone(), one.clone());
                async move {
                    metrics::histogram!(crate::metrics::DB_BATCH_SIZE).record(items.len() as f64);
                    let (items, result) = many(pool.clone(), items).await;
                    answer_batch(items, result, |item| one(pool.clone(), item)).await
                }
            });
        Self { batcher }
    }

    /// Write `item` with the others waiting now; it comes back with its
    /// answer.
    pub async fn write(&self, item: T) -> Result<(T, R), DbError> {
        let (item, answer) = self.batcher.call(item).await?;
        Ok((item, answer?))
    }
}

/// The answers of a group-commit batch: `result` (the batch written in one
/// statement) split per item; if it failed, each item written alone by
/// `one`, so an error belongs to the item that caused it, unless the
/// database was unreachable: then every item fails at once (writing them
/// one by one would only wait out the pool's timeout once per item).
async fn answer_batch<T, R, F>(
    items: Vec<T>,
    result: Result<Vec<R>, DbError>,
    one: impl Fn(T) -> F,
) -> Vec<(T, Result<R, DbError>)>
where
    F: std::future::Future<Output = (T, Result<R, DbError>)>,
{
    match result {
        Ok(answers) if answers.len() == items.len() => items.into_iter().zip(answers.into_iter().map(Ok)).collect(),
        Err(e) if items.len() == 1 || e.is_unreachable() => {
            let reason = crate::error::chain(&e);
            let mut first = Some(e);
            items
                .into_iter()
                .map(|m| (m, Err(first.take().unwrap_or_else(|| DbError::Unreachable(reason.clone())))))
                .collect()
        }
        _ => {
            let mut out = Vec::with_capacity(items.len());
            for m in items {
                out.push(one(m).await);
            }
            out
        }
    }
}

/// Whether a commit waits until its WAL is on disk before it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commits {
    /// Postgres' default (`synchronous_commit = on`): an answered commit
    /// survives a crash of Postgres.
    Durable,
    /// `synchronous_commit = off` on the pool's direct connections: a commit
    /// answers before its WAL is flushed (within `wal_writer_delay`, 200 ms
    /// by default), so a crash of Postgres may lose the last commits but
    /// never leaves a half-written one. Only for writes whose loss the
    /// pipeline makes up for (ingest's claim: the submission's durable
    /// record is its JetStream message, and publish's upsert writes the row
    /// whole). Behind a transaction pooler, which refuses startup options,
    /// commits stay durable.
    Relaxed,
}

/// Build a pool with durable commits ([`pool_with`]).
pub fn pool(config: &DatabaseConfig) -> Result<Pool, DbError> {
    pool_with(config, Commits::Durable)
}

/// Build a pool; connections are opened lazily, each bounded by the
/// configured timeout (connect, wait for a slot, and every statement).
pub fn pool_with(config: &DatabaseConfig, commits: Commits) -> Result<Pool, DbError> {
    let (url, mode) = tls_mode(config.url.expose_secret());
    let pooler = behind_transaction_pooler(&url);
    let url = without_param(&url, "pgbouncer");
    let mut pg: tokio_postgres::Config = url.parse().map_err(DbError::InvalidUrl)?;
    let tls = tls_connector(mode, config.ca_file.as_deref())?;
    pg.connect_timeout(config.timeout);
    if !pooler {
        // Poolers refuse startup options; there the pool's own timeouts
        // (wait, create, recycle) bound the work instead.
        // Named statements are planned at each run by default: a generic
        // plan made while a table was small (a sequential scan of
        // `halakhot` for each batch) would stay as the table grows. The
        // write path's transactions (the claim, the upsert) choose generic
        // plans made safe ([`WRITE_SETTINGS`]).
        let ms = config.timeout.as_millis();
        let relaxed = if commits == Commits::Relaxed { " -c synchronous_commit=off" } else { "" };
        pg.options(format!("-c statement_timeout={ms} -c plan_cache_mode=force_custom_plan{relaxed}"));
    }
    let manager = Manager::from_config(pg, tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Ok(Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.timeout))
        .create_timeout(Some(config.timeout))
        .recycle_timeout(Some(config.timeout))
        .build()?)
}

/// Report the pool in `/health/ready` (required: a connection and
/// `SELECT 1`) and in `/metrics` (`halakha_db_pool_*`, read at each scrape).
pub fn report_health(pool: &Pool, readiness: &crate::health::Readiness) {
    let probed = pool.clone();
    readiness.probe(
        "postgres",
        true,
        Arc::new(move || {
            let pool = probed.clone();
            Box::pin(async move {
                let client = pool.get().await.map_err(|e| crate::error::chain(&e))?;
                client.simple_query("SELECT 1").await.map(|_| ()).map_err(|e| crate::error::chain(&e))
            })
        }),
    );
    report_pool_metrics(pool);
}

/// Export the pool's use at each scrape (`halakha_db_pool_*`).
fn report_pool_metrics(pool: &Pool) {
    let pool = pool.clone();
    crate::metrics::on_scrape(move || {
        let s = pool.status();
        let in_use = s.size.saturating_sub(s.available);
        metrics::gauge!(crate::metrics::DB_POOL_CONNECTIONS, "state" => "in_use").set(in_use as f64);
        metrics::gauge!(crate::metrics::DB_POOL_CONNECTIONS, "state" => "idle").set(s.available as f64);
        metrics::gauge!(crate::metrics::DB_POOL_MAX_CONNECTIONS).set(s.max_size as f64);
        metrics::gauge!(crate::metrics::DB_POOL_WAITING).set(s.waiting as f64);
    });
}

/// Halakhot neither published nor failed: the "still open" side of the
/// pipeline's books.
pub async fn open_halakhot(pool: &Pool) -> Result<i64, DbError> {
    let conn = pool.get().await?;
    let row =
        conn.query_typed_one("SELECT count(*) FROM halakhot WHERE status NOT IN ('published', 'failed')", &[]).await?;
    Ok(row.get(0))
}

/// Apply the embedded migrations. Several replicas may start at once: a
/// session advisory lock makes them take turns, and refinery skips what is
/// already applied. This needs one session: run it over a direct or
/// session-mode connection, not a transaction-mode pooler (set
/// `DATABASE_MIGRATE_ON_START=false` there and run `halakha db migrate`
/// with the direct URL).
pub async fn migrate(pool: &Pool) -> Result<(), DbError> {
    const LOCK: &str = "SELECT pg_advisory_lock(hashtext('halakha_migrations'))";
    const UNLOCK: &str = "SELECT pg_advisory_unlock(hashtext('halakha_migrations'))";
    let mut conn = pool.get().await?;
    conn.batch_execute(LOCK).await?;
    let client: &mut tokio_postgres::Client = &mut conn;
    let result = embedded::migrations::runner().run_async(client).await;
    conn.batch_execute(UNLOCK).await?;
    result?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_batch_is_written_item_by_item_unless_the_database_is_unreachable() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = AtomicUsize::new(0);
        let one = |m: u32| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { (m, if m == 2 { Err(DbError::Tls("bad item".into())) } else { Ok(m * 10) }) }
        };
        let ok = answer_batch(vec![1, 2, 3], Ok(vec![10, 20, 30]), one).await;
        assert!(ok.iter().all(|(m, r)| r.as_ref().ok() == Some(&(m * 10))));
        assert_eq!(calls.load(Ordering::SeqCst), 0);

        // A statement error: each item alone, only the bad one fails.
        let split = answer_batch(vec![1, 2, 3], Err(DbError::Tls("statement".into())), one).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let failed: Vec<u32> = split.iter().filter(|(_, r)| r.is_err()).map(|(m, _)| *m).collect();
        assert_eq!(failed, vec![2]);

        // Unreachable: every item fails at once, none is tried alone.
        let down = answer_batch(vec![1, 2, 3], Err(DbError::Unreachable("refused".into())), one).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert!(down.iter().all(|(_, r)| r.as_ref().is_err_and(DbError::is_unreachable)));
    }

    #[test]
    fn sslmode_maps_to_what_tokio_postgres_reads_and_a_tls_mode() {
        assert_eq!(tls_mode("postgres://h/db").1, TlsMode::Encrypt);
        assert_eq!(tls_mode("postgres://h/db?sslmode=disable").1, TlsMode::Off);
        assert_eq!(tls_mode("postgres://h/db?sslmode=require").1, TlsMode::Encrypt);
        let (url, mode) = tls_mode("postgres://h/db?application_name=x&sslmode=verify-full");
        assert_eq!((url.as_str(), mode), ("postgres://h/db?application_name=x&sslmode=require", TlsMode::Verify));
    }

    #[test]
    fn a_transaction_pooler_is_recognised_by_port_or_marker() {
        assert!(behind_transaction_pooler("postgres://u:p@aws-0-eu.pooler.supabase.com:6543/postgres"));
        assert!(behind_transaction_pooler("postgres://u@h:5432/db?pgbouncer=true&sslmode=require"));
        assert!(!behind_transaction_pooler("postgres://u:6543@h:5432/db"));
        assert_eq!(
            without_param("postgres://h/db?pgbouncer=true&sslmode=require", "pgbouncer"),
            "postgres://h/db?sslmode=require"
        );
    }
}
