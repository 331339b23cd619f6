use halakha_common::{config, telemetry};
use halakha_publish::{App, Config};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = config::load_or_exit(Config::read);
    telemetry::init_tracing(&config.telemetry);
    let app = App::build(config).await.map_err(|e| anyhow::Error::new(e).context("halakha-publish could not start"))?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        halakha_common::shutdown::signal().await;
        trigger.cancel();
    });
    app.run(shutdown).await;
    Ok(())
}
