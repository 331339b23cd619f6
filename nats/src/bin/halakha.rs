//! `halakha`: the operator's tool. This first cut has the database
//! migrations and a health probe; status, replay and dead-letter commands
//! come with the operator CLI issue.
//!
//! Exit codes: 0 ok, 1 failure, 2 usage, 64 configuration.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use halakha_common::config::{self, DatabaseConfig, Source as _};
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
    /// Re-publish stored messages of a stage's input stream back to it,
    /// under fresh message ids (the business ids stay the same).
    Replay {
        /// ingest, enrich or publish: whose input to replay.
        #[arg(long)]
        stage: halakha_nats::Stage,
        /// First stream sequence.
        #[arg(long, required_unless_present = "since")]
        from_seq: Option<u64>,
        /// Last stream sequence (default: the last stored).
        #[arg(long)]
        to_seq: Option<u64>,
        /// Messages stored at or after this time (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        since: Option<time::OffsetDateTime>,
        /// Messages stored before this time (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        until: Option<time::OffsetDateTime>,
        /// Only this halakha id (repeat for several).
        #[arg(long = "id")]
        ids: Vec<String>,
        /// Messages per second at most.
        #[arg(long)]
        rate: Option<u32>,
        /// Count what would be sent; send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Submit a file of JSON lines (`{"content", "schedule_days"?, "lang"?,
    /// "source"?, "idempotency_key"?}`) for demos and bulk loads.
    Submit {
        /// The file; `-` for standard input.
        file: std::path::PathBuf,
        /// `nats` (JetStream, `<ns>.submitted`) or `http` (needs `--url` and
        /// `HALAKHA_API_KEY`).
        #[arg(long, default_value = "nats")]
        via: Via,
        /// The ingest API, for `--via http` (e.g. http://127.0.0.1:8000).
        #[arg(long)]
        url: Option<String>,
        /// Submissions per second at most.
        #[arg(long)]
        rate: Option<u32>,
    },
    /// The stream and consumer definitions of `nats/topology/`.
    Topology {
        #[command(subcommand)]
        command: TopologyCommand,
    },
    /// Each stage's consumer: pending, unacknowledged, redelivered, last
    /// activity, dead letters.
    Status {
        /// JSON, for scripts.
        #[arg(long)]
        json: bool,
        /// Refresh every 2 s, with throughput over the last minute.
        #[arg(long)]
        watch: bool,
    },
    /// Dead letters: list them, put them back where they failed.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// The pipeline's Postgres database.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Probe a health endpoint (for container health checks: no curl needed).
    /// Exit 0 when it answers 2xx, 1 otherwise.
    Health {
        /// For example http://127.0.0.1:9101/health/ready; default: the
        /// readiness route on this container's `METRICS_ADDR` port (so one
        /// image health check serves every stage).
        url: Option<String>,
        /// Seconds to wait for an answer.
        #[arg(long, default_value_t = 3)]
        timeout: u64,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Via {
    Nats,
    Http,
}

#[derive(Subcommand)]
enum TopologyCommand {
    /// Create or update every stream and the stages' consumers (idempotent).
    Apply,
    /// What the server has: streams, their consumers, their counts.
    Show,
    /// What the server has, against the definitions; exit 1 when they differ.
    Diff,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// One entry, whole (JSON).
    Show { seq: u64 },
    /// Remove entries (of one stage, or all). Asks first unless `--yes`.
    Purge {
        #[arg(long)]
        stage: Option<halakha_nats::Stage>,
        #[arg(long)]
        yes: bool,
    },
    /// The dead letters, oldest first.
    List {
        /// Only this stage's.
        #[arg(long)]
        stage: Option<halakha_nats::Stage>,
        /// Failed at or after this time (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        since: Option<time::OffsetDateTime>,
        /// The reason contains this text (case-insensitive).
        #[arg(long)]
        reason: Option<String>,
        /// One JSON object per line, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Put entries back on the subject where they failed; each entry is
    /// removed once its message is stored again.
    Redrive {
        /// The entries' sequences in the dead-letter stream.
        #[arg(long = "seq", required_unless_present = "all")]
        seqs: Vec<u64>,
        /// Every entry (of `--stage` when given).
        #[arg(long, conflicts_with = "seqs")]
        all: bool,
        #[arg(long)]
        stage: Option<halakha_nats::Stage>,
        /// Entries per second at most.
        #[arg(long)]
        rate: Option<u32>,
        /// Count what would be sent; send nothing.
        #[arg(long)]
        dry_run: bool,
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
        Command::Health { url, timeout } => {
            let url = match url.or_else(|| local_ready_url(std::env::var("METRICS_ADDR").ok().as_deref())) {
                Some(url) => url,
                None => {
                    eprintln!("halakha health: give a URL, or set METRICS_ADDR (host:port) to probe this stage");
                    return ExitCode::from(2);
                }
            };
            health(&url, Duration::from_secs(timeout)).await
        }
        Command::Replay { stage, from_seq, to_seq, since, until, ids, rate, dry_run } => {
            let Some((js, names)) = nats().await else { return ExitCode::FAILURE };
            let from = from_seq.unwrap_or(1);
            let last = match js.get_stream(names.route(stage).input_stream).await {
                Ok(mut s) => s.info().await.map(|i| i.state.last_sequence).unwrap_or(0),
                Err(e) => {
                    eprintln!("halakha replay failed: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let bar = progress_bar(to_seq.unwrap_or(last).min(last).saturating_sub(from) + 1, "messages");
            let spec =
                halakha_nats::ops::Replay { stage, from, to: to_seq, since, until, ids, dry_run, pace: pace(rate) };
            let result = halakha_nats::ops::replay(&js, &names, &spec, |_| bar.inc(1)).await;
            bar.finish_and_clear();
            finish("replay", result, dry_run)
        }
        Command::Submit { file, via, url, rate } => submit(&file, via, url.as_deref(), rate).await,
        Command::Topology { command } => {
            let Some((js, names)) = nats().await else { return ExitCode::FAILURE };
            match command {
                TopologyCommand::Apply => {
                    let result = async {
                        halakha_nats::topology::apply_streams(&js, &names).await?;
                        let routes = halakha_nats::Stage::ALL
                            .iter()
                            .map(|s| names.route(*s))
                            .chain([names.status_route(), names.advisory_route()]);
                        for route in routes {
                            let c = halakha_nats::topology::consumer(&names, &route, &Default::default())?;
                            halakha_nats::topology::apply_consumer(&js, &route, c).await?;
                            println!("consumer {}/{} applied", route.input_stream, route.consumer);
                        }
                        Ok::<_, halakha_nats::topology::TopologyError>(())
                    }
                    .await;
                    match result {
                        Ok(()) => {
                            println!("streams {} applied", names.streams().join(", "));
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("halakha topology apply failed: {}", chain(&e));
                            ExitCode::FAILURE
                        }
                    }
                }
                TopologyCommand::Show => match halakha_nats::ops::topology_show(&js, &names).await {
                    Ok(lines) => {
                        for l in lines {
                            println!("{l}");
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("halakha topology show failed: {}", chain(&e));
                        ExitCode::FAILURE
                    }
                },
                TopologyCommand::Diff => match halakha_nats::ops::topology_diff(&js, &names).await {
                    Ok(diffs) if diffs.is_empty() => {
                        println!("the server matches the definitions");
                        ExitCode::SUCCESS
                    }
                    Ok(diffs) => {
                        for d in diffs {
                            println!("{} {}: file {} / server {}", d.object, d.field, d.file, d.server);
                        }
                        ExitCode::FAILURE
                    }
                    Err(e) => {
                        eprintln!("halakha topology diff failed: {}", chain(&e));
                        ExitCode::FAILURE
                    }
                },
            }
        }
        Command::Status { json, watch } => {
            let Some((js, names)) = nats().await else { return ExitCode::FAILURE };
            // The invariant needs the database: shown when DATABASE_URL is set.
            let pool = match std::env::var("DATABASE_URL").ok().or_else(|| config::Env::load().get("DATABASE_URL")) {
                Some(_) => {
                    let c = config::load_or_exit(DatabaseConfig::read);
                    db::pool(&c).ok()
                }
                None => None,
            };
            let mut samples: std::collections::VecDeque<(std::time::Instant, Vec<u64>)> = Default::default();
            loop {
                let status = match halakha_nats::ops::status(&js, &names).await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("halakha status failed: {}", chain(&e));
                        return ExitCode::FAILURE;
                    }
                };
                let unaccounted = match &pool {
                    Some(p) => halakha_nats::ops::unaccounted(p, &status).await.ok(),
                    None => None,
                };
                // Throughput: deliveries per minute over the samples of the last minute.
                let now = std::time::Instant::now();
                samples.push_back((now, status.stages.iter().map(|s| s.delivered).collect()));
                while samples.front().is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(60)) {
                    samples.pop_front();
                }
                let per_minute: Vec<Option<f64>> = match (samples.front(), samples.len() > 1) {
                    (Some((t0, first)), true) => {
                        let secs = now.duration_since(*t0).as_secs_f64().max(0.001);
                        status
                            .stages
                            .iter()
                            .zip(first)
                            .map(|(s, f)| Some((s.delivered - f) as f64 * 60.0 / secs))
                            .collect()
                    }
                    _ => vec![None; status.stages.len()],
                };
                if json {
                    let mut v = serde_json::to_value(&status).unwrap_or_default();
                    v["unaccounted"] = serde_json::json!(unaccounted);
                    for (stage, rate) in v["stages"].as_array_mut().into_iter().flatten().zip(&per_minute) {
                        stage["per_minute"] = serde_json::json!(rate);
                    }
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                } else {
                    if watch {
                        print!("\x1b[2J\x1b[H");
                    }
                    println!("namespace {}", status.namespace);
                    println!(
                        "{:<8} {:>8} {:>9} {:>12} {:>13} {:>10}  last active",
                        "stage", "pending", "unacked", "redelivered", "dead letters", "per min"
                    );
                    for (s, rate) in status.stages.iter().zip(&per_minute) {
                        println!(
                            "{:<8} {:>8} {:>9} {:>12} {:>13} {:>10}  {}",
                            s.stage,
                            s.pending,
                            s.ack_pending,
                            s.redelivered,
                            s.dead_letters,
                            rate.map(|r| format!("{r:.0}")).unwrap_or_else(|| "-".into()),
                            s.last_active.clone().unwrap_or_else(|| "-".into())
                        );
                    }
                    match unaccounted {
                        Some(n) => println!("unaccounted (open − waiting, 0 when idle): {n}"),
                        None => println!("unaccounted: set DATABASE_URL to compute it"),
                    }
                }
                if !watch {
                    return ExitCode::SUCCESS;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        Command::Dlq { command } => {
            let Some((js, names)) = nats().await else { return ExitCode::FAILURE };
            match command {
                DlqCommand::Show { seq } => match halakha_nats::ops::dlq_list(&js, &names, None).await {
                    Ok(entries) => match entries.iter().find(|e| e.seq == seq) {
                        Some(e) => {
                            println!("{}", serde_json::to_string_pretty(&e.entry).unwrap_or_default());
                            ExitCode::SUCCESS
                        }
                        None => {
                            eprintln!("no dead letter at sequence {seq}");
                            ExitCode::FAILURE
                        }
                    },
                    Err(e) => {
                        eprintln!("halakha dlq show failed: {}", chain(&e));
                        ExitCode::FAILURE
                    }
                },
                DlqCommand::Purge { stage, yes } => {
                    if !yes {
                        use std::io::{BufRead, IsTerminal, Write};
                        if !std::io::stdin().is_terminal() {
                            eprintln!("refusing to purge without --yes (no terminal to ask)");
                            return ExitCode::from(2);
                        }
                        let which = stage.map(|s| s.to_string()).unwrap_or_else(|| "every stage".into());
                        eprint!("Remove the dead letters of {which} in {}? Type yes: ", names.namespace());
                        let _ = std::io::stderr().flush();
                        let mut answer = String::new();
                        let _ = std::io::stdin().lock().read_line(&mut answer);
                        if answer.trim() != "yes" {
                            eprintln!("nothing removed");
                            return ExitCode::FAILURE;
                        }
                    }
                    match halakha_nats::ops::dlq_purge(&js, &names, stage).await {
                        Ok(n) => {
                            println!("{n} dead letter(s) removed");
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("halakha dlq purge failed: {}", chain(&e));
                            ExitCode::FAILURE
                        }
                    }
                }
                DlqCommand::List { stage, since, reason, json } => match halakha_nats::ops::dlq_find(
                    &js,
                    &names,
                    &halakha_nats::ops::DlqFilter { stage, since, reason },
                )
                .await
                {
                    Ok(entries) => {
                        for e in &entries {
                            if json {
                                println!("{}", serde_json::to_string(e).unwrap_or_default());
                            } else {
                                println!(
                                    "{:>6}  {}  {:<8} {:<15} {}  {}",
                                    e.seq,
                                    e.entry.failed_at.date(),
                                    e.entry.stage,
                                    e.entry.error_kind.as_str(),
                                    e.entry.id.as_deref().unwrap_or("-"),
                                    e.entry.reason.chars().take(100).collect::<String>()
                                );
                            }
                        }
                        if !json {
                            eprintln!("{} dead letter(s)", entries.len());
                        }
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("halakha dlq list failed: {}", chain(&e));
                        ExitCode::FAILURE
                    }
                },
                DlqCommand::Redrive { seqs, all, stage, rate, dry_run } => {
                    let seqs = if all {
                        match halakha_nats::ops::dlq_list(&js, &names, stage).await {
                            Ok(entries) => entries.iter().map(|e| e.seq).collect(),
                            Err(e) => {
                                eprintln!("halakha dlq redrive failed: {}", chain(&e));
                                return ExitCode::FAILURE;
                            }
                        }
                    } else {
                        seqs
                    };
                    let bar = progress_bar(seqs.len() as u64, "entries");
                    let result =
                        halakha_nats::ops::dlq_redrive(&js, &names, &seqs, dry_run, pace(rate), |_| bar.inc(1)).await;
                    bar.finish_and_clear();
                    finish("dlq redrive", result, dry_run)
                }
            }
        }
    }
}

fn parse_time(s: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("expected an RFC 3339 time such as 2026-11-24T08:00:00Z: {e}"))
}

/// The time between two sends for a rate in messages per second.
fn pace(rate: Option<u32>) -> Option<Duration> {
    rate.filter(|r| *r > 0).map(|r| Duration::from_secs_f64(1.0 / f64::from(r)))
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(&format!("{{bar:40}} {{pos}}/{{len}} {what} ({{eta}})"))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

/// Print what an action did, or why it failed; its exit code.
fn finish(
    command: &str,
    result: Result<halakha_nats::ops::Report, halakha_nats::ops::OpsError>,
    dry_run: bool,
) -> ExitCode {
    match result {
        Ok(r) => {
            let dry = if dry_run { " (dry run)" } else { "" };
            println!("found {}, sent {}, skipped {}{dry}", r.found, r.sent, r.skipped);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("halakha {command} failed: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// NATS and the namespace, from `NATS_URL`, `PIPELINE_NAMESPACE` and
/// `STREAM_REPLICAS` (and `.env`), as the stages read them.
async fn nats() -> Option<(async_nats::jetstream::Context, halakha_nats::Names)> {
    use secrecy::ExposeSecret;
    let (url, namespace, replicas) = config::load_or_exit(|r| {
        let url = secrecy::SecretString::from(r.string_or("NATS_URL", "nats://127.0.0.1:4222"));
        let ns: halakha_nats::Namespace = r.parse_or("PIPELINE_NAMESPACE", halakha_nats::Namespace::default());
        let replicas: usize = r.ranged("STREAM_REPLICAS", 1, 1..=5);
        (url, ns, replicas)
    });
    match async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(match halakha_nats::connect::server_addrs(url.expose_secret()) {
            Ok(addrs) => addrs,
            Err(e) => {
                eprintln!("{e}");
                return None;
            }
        })
        .await
    {
        Ok(client) => Some((
            async_nats::jetstream::new(client),
            halakha_nats::Names::new(namespace).with_stream_replicas(replicas),
        )),
        Err(e) => {
            eprintln!("could not connect to NATS: {e}");
            None
        }
    }
}

async fn migrate(config: &DatabaseConfig) -> Result<(), db::DbError> {
    let pool = db::pool(config)?;
    db::migrate(&pool).await
}

/// A plain HTTP/1.1 GET over TCP: enough for our own health endpoints.
/// `http://127.0.0.1:<port>/health/ready` for a `METRICS_ADDR` such as
/// `0.0.0.0:9102` (the stage in this container).
fn local_ready_url(metrics_addr: Option<&str>) -> Option<String> {
    let addr: std::net::SocketAddr = metrics_addr?.trim().parse().ok()?;
    Some(format!("http://127.0.0.1:{}/health/ready", addr.port()))
}

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

/// Bulk submission: a count of accepted, duplicates and rejected (with reasons).
async fn submit(file: &std::path::Path, via: Via, url: Option<&str>, rate: Option<u32>) -> ExitCode {
    let text = if file.as_os_str() == "-" {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut s);
        s
    } else {
        match std::fs::read_to_string(file) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot read {}: {e}", file.display());
                return ExitCode::FAILURE;
            }
        }
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let pace = pace(rate);
    let (mut accepted, mut duplicates, mut rejected) = (0u64, 0u64, Vec::<String>::new());
    halakha_common::install_crypto_provider();
    let http = match reqwest::Client::builder().timeout(Duration::from_secs(30)).build() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot build an HTTP client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let nats = match via {
        Via::Nats => match nats().await {
            Some(n) => Some(n),
            None => return ExitCode::FAILURE,
        },
        Via::Http => None,
    };
    let key = std::env::var("HALAKHA_API_KEY").unwrap_or_default();
    if matches!(via, Via::Http) && (url.is_none() || key.is_empty()) {
        eprintln!("--via http needs --url and HALAKHA_API_KEY");
        return ExitCode::from(2);
    }
    let bar = progress_bar(lines.len() as u64, "lines");
    for (n, line) in lines.iter().enumerate() {
        bar.inc(1);
        if serde_json::from_str::<halakha_common::Submission>(line).is_err() {
            rejected.push(format!("line {}: not a submission (expected {{\"content\": ...}})", n + 1));
            continue;
        }
        match (&nats, via) {
            (Some((js, names)), _) => {
                let subject = names.subject(halakha_nats::names::Subject::Submitted);
                match js.publish(subject, line.to_string().into()).await {
                    Ok(ack) => match ack.await {
                        Ok(a) if a.duplicate => duplicates += 1,
                        Ok(_) => accepted += 1,
                        Err(e) => rejected.push(format!("line {}: {e}", n + 1)),
                    },
                    Err(e) => rejected.push(format!("line {}: {e}", n + 1)),
                }
            }
            _ => {
                let sent = http
                    .post(format!("{}/v1/halakhot", url.unwrap_or_default().trim_end_matches('/')))
                    .header("X-API-Key", &key)
                    .header("Content-Type", "application/json")
                    .body(line.to_string())
                    .send()
                    .await;
                match sent {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let body = r.text().await.unwrap_or_default();
                        match status {
                            202 if body.contains("\"duplicate\":true") => duplicates += 1,
                            202 => accepted += 1,
                            _ => rejected.push(format!("line {}: {status} {body}", n + 1)),
                        }
                    }
                    Err(e) => rejected.push(format!("line {}: {e}", n + 1)),
                }
            }
        }
        if let Some(p) = pace {
            tokio::time::sleep(p).await;
        }
    }
    bar.finish_and_clear();
    for r in &rejected {
        println!("rejected {r}");
    }
    println!("accepted {accepted}, duplicates {duplicates}, rejected {}", rejected.len());
    if rejected.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

#[cfg(test)]
mod tests {
    use super::local_ready_url;

    #[test]
    fn the_health_probe_defaults_to_this_stages_metrics_port() {
        assert_eq!(local_ready_url(Some("0.0.0.0:9102")).as_deref(), Some("http://127.0.0.1:9102/health/ready"));
        assert_eq!(local_ready_url(Some("[::]:9103")).as_deref(), Some("http://127.0.0.1:9103/health/ready"));
        assert_eq!(local_ready_url(Some("not an address")), None);
        assert_eq!(local_ready_url(None), None);
    }
}
