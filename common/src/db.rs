//! Postgres access shared by the stages that write to the database:
//! the connection pool and the embedded, append-only migrations.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use secrecy::ExposeSecret;
use tokio_postgres::NoTls;

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
}

/// Build a pool; connections are opened lazily, each bounded by the
/// configured timeout (connect, wait for a slot, and every statement).
pub fn pool(config: &DatabaseConfig) -> Result<Pool, DbError> {
    let mut pg: tokio_postgres::Config = config.url.expose_secret().parse().map_err(DbError::InvalidUrl)?;
    pg.connect_timeout(config.timeout);
    let ms = config.timeout.as_millis();
    pg.options(format!("-c statement_timeout={ms}"));
    let manager = Manager::from_config(pg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Ok(Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(config.timeout))
        .create_timeout(Some(config.timeout))
        .recycle_timeout(Some(config.timeout))
        .build()?)
}

/// Apply the embedded migrations. Several replicas may start at once: a
/// session advisory lock makes them take turns, and refinery skips what is
/// already applied.
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
