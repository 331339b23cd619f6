//! Shared vocabulary of the halakha pipeline: the versioned message
//! envelope, typed configuration, the error taxonomy, text normalisation,
//! Postgres access and telemetry (logs, metrics, health endpoints).
//!
//! Every stage binary depends on this crate; it depends on no stage.

pub mod batch;
pub mod cache;
pub mod config;
pub mod db;
pub mod envelope;
pub mod error;
pub mod health;
mod log_json;
mod log_writer;
pub mod metrics;
pub mod shutdown;
pub mod telemetry;
pub mod text;
pub mod trace;

pub use envelope::{
    DeadLetter, Enriched, Enrichment, Envelope, ErrorKind, Halakha, Ingested, Lang, Published, SourceRef, Submission,
    Usage,
};
pub use error::StageError;

/// Install the process-wide rustls crypto provider (ring).
///
/// reqwest is built without a default provider to avoid compiling aws-lc on
/// small machines; every binary calls this once before making HTTP clients.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
