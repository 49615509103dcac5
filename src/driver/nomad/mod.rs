//! Nomad plugin adapter: handshake, gRPC services, configuration and task lifecycle.

pub mod base;
pub mod cgroup;
pub mod config;
pub mod error;
pub mod go_plugin;
pub mod handle;
pub mod logging;
pub mod plugin;
pub mod proto;
pub mod schema;
pub mod service;
