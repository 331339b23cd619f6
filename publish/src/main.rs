use anyhow::Context as _;
use halakha_common::{config, telemetry};
use halakha_publish::{App, Config};

fn main() -> anyhow::Result<()> {
    let config = config::load_or_exit(Config::read);
    let logs = config.stage.telemetry.clone();
    telemetry::run_logged(&logs, async {
        let app = App::build(config).await.context("halakha-publish could not start")?;
        Ok(app.run(halakha_nats::stage::shutdown_on_signal()).await?)
    })?
}
