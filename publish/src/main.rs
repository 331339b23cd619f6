use anyhow::Context as _;
use halakha_common::{config, telemetry};
use halakha_publish::{App, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = config::load_or_exit(Config::read);
    let _logs = telemetry::init_tracing(&config.stage.telemetry);
    let app = App::build(config).await.context("halakha-publish could not start")?;
    Ok(app.run(halakha_nats::stage::shutdown_on_signal()).await?)
}
