//! Everything that speaks JetStream: subject and stream names, the
//! topology, the publisher with de-duplication ids, and the stage runner.
//!
//! Stage crates hold business logic only: they implement a [`runner::Handler`]
//! and hand it to [`runner::Runner`].

pub mod advisory;
pub mod connect;
pub mod names;
pub mod ops;
pub mod publisher;
pub mod runner;
pub mod stage;
pub mod topology;

pub use names::{Names, Namespace, Stage};
pub use publisher::{PublishError, Publisher};
pub use runner::{Delivery, Handled, Handler, Runner, RunnerConfig};
