//! Nomad plugin adapter: handshake, gRPC services, configuration and task lifecycle.

pub mod config;
pub mod plugin;
pub mod proto;
