//! The pgcdc daemon: configuration, command line, and the supervision tree
//! around the engine in `pgcdc-actors`.

pub mod app;
pub mod check;
pub mod cli;
pub mod error;
pub mod http;
pub mod logs;
pub mod settings;
pub mod telemetry;
pub mod topics;
pub mod verify;
