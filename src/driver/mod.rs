//! The per-VM state machine ([`vm`]) and the Nomad adapter on top of it ([`nomad`]).

pub mod nomad;
pub mod vm;
