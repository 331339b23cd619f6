//! Connecting to NATS, with readiness tied to the connection state.

use std::time::Duration;

use async_nats::jetstream;
use halakha_common::health::ReadyFlag;

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
        .connect(url)
        .await?;
    ready.set(true);
    let js = jetstream::new(client.clone());
    Ok((client, js))
}
