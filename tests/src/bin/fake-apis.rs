//! `fake-apis`: the test fakes of OpenAI and Notion on one port, for
//! trying the pipeline by hand without network access or accounts.
//!
//! Point `OPENAI_BASE_URL` at `http://<addr>/v1` and `NOTION_BASE_URL` at
//! `http://<addr>`, with `OPENAI_API_KEY=sk-test-key`,
//! `NOTION_TOKEN=secret_test_token` and
//! `NOTION_DATABASE_ID=0f1e2d3c4b5a69788796a5b4c3d2e1f0`.

use halakha_tests::fakes::{self, Model};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::var("FAKE_APIS_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let listener = std::net::TcpListener::bind(&addr).map_err(|e| anyhow::anyhow!("could not bind {addr}: {e}"))?;
    let server = wiremock::MockServer::builder().listener(listener).start().await;
    fakes::mount_openai(&server, Model::Faithful).await;
    fakes::mount_notion(&server).await;
    println!("Fake OpenAI and Notion listening on {}", server.uri());
    halakha_common::shutdown::signal().await;
    Ok(())
}
