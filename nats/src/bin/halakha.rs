//! `halakha`: the operator's tool. This first cut has the database
//! migrations and a health probe; status, replay and dead-letter commands
//! come with the operator CLI issue.
//!
//! Exit codes: 0 ok, 1 failure, 2 usage, 64 configuration.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use halakha_common::config::{self, DatabaseConfig};
use halakha_common::db;
use halakha_common::error::chain;

#[derive(Parser)]
#[command(name = "halakha", version, about = "Operate the halakha pipeline")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The pipeline's Postgres database.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Probe a health endpoint (for container health checks: no curl needed).
    /// Exit 0 when it answers 2xx, 1 otherwise.
    Health {
        /// For example http://127.0.0.1:9101/health/ready
        url: String,
        /// Seconds to wait for an answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Apply the migrations (idempotent; replicas take turns). Reads
    /// DATABASE_URL (use the direct or session-mode URL, not a
    /// transaction-mode pooler), DATABASE_TIMEOUT_SECS, DATABASE_CA_FILE.
    Migrate,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Db { command: DbCommand::Migrate } => {
            let config = config::load_or_exit(DatabaseConfig::read);
            match migrate(&config).await {
                Ok(()) => {
                    println!("Migrations applied");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("halakha db migrate failed: {}", chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Health { url, timeout } => health(&url, Duration::from_secs(timeout)).await,
    }
}

async fn migrate(config: &DatabaseConfig) -> Result<(), db::DbError> {
    let pool = db::pool(config)?;
    db::migrate(&pool).await
}

/// A plain HTTP/1.1 GET over TCP: enough for our own health endpoints.
async fn health(url: &str, timeout: Duration) -> ExitCode {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(rest) = url.strip_prefix("http://") else {
        eprintln!("only http:// URLs are probed");
        return ExitCode::from(2);
    };
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = vec![0u8; 64];
        let n = stream.read(&mut head).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).into_owned())
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(Ok(head)) if head.split(' ').nth(1).is_some_and(|code| code.starts_with('2')) => ExitCode::SUCCESS,
        Ok(Ok(head)) => {
            eprintln!("{url}: {}", head.lines().next().unwrap_or(""));
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("{url}: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("{url}: no answer within {timeout:?}");
            ExitCode::FAILURE
        }
    }
}
