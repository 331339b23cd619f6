//! Connecting to NATS, with readiness tied to the connection state.

use std::time::Duration;

use async_nats::jetstream;
use halakha_common::health::ReadyFlag;

/// The servers of a `NATS_URL`: one URL, or several separated by commas
/// (the seeds of a cluster; the client learns the other members from the
/// server it reaches). An invalid entry is an error naming its position,
/// never its text (it may carry credentials).
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, async_nats::ConnectError> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .enumerate()
        .map(|(i, u)| {
            u.parse::<async_nats::ServerAddr>().map_err(|_| {
                async_nats::ConnectError::with_source(
                    async_nats::ConnectErrorKind::ServerParse,
                    format!("NATS_URL entry {} is not a NATS URL", i + 1),
                )
            })
        })
        .collect()
}

/// Connect to `url` as `name`. The flag follows the connection: false
/// while disconnected, true once (re)connected; the client reconnects on
/// its own.
pub async fn connect(
    url: &str,
    name: &str,
    ready: ReadyFlag,
) -> Result<(async_nats::Client, jetstream::Context), async_nats::ConnectError> {
    let flag = ready.clone();
    let client = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let flag = flag.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("Connected to NATS");
                        flag.set(true);
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("Disconnected from NATS; reconnecting");
                        flag.set(false);
                    }
                    async_nats::Event::Closed => flag.set(false),
                    other => tracing::warn!(event = %other, "NATS event"),
                }
            }
        })
        .connect(server_addrs(url)?)
        .await?;
    ready.set(true);
    let js = jetstream::new(client.clone());
    Ok((client, js))
}
