//! Nomad plugin adapter: handshake, gRPC services, configuration and task lifecycle.

pub mod plugin;
pub mod proto;
