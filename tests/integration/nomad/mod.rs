//! End-to-end tests against a real Nomad agent (v1.6.5, from `scripts/install-nomad.sh` or
//! `NOMAD_BIN`).
//!
//! [`agent::NomadAgent`] starts one agent per test, serialized across the test binary.

pub mod agent;
pub mod process;

mod builtin_qemu;
mod qemu_bad_jobs;
mod qemu_common;
mod qemu_lifecycle;
mod qemu_recovery;
mod raw_exec;
