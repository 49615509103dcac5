//! Integration tests against real QEMU and a real Nomad agent.
//!
//! Guests come from `fixtures/build-guests.sh`; a missing guest or QEMU binary fails the test
//! with the command to run, it never skips it.

mod cgroup_v1;
mod fake_qmp;
mod fingerprint_host;
mod nomad;
mod plugin_protocol;
mod plugin_tasks;
mod qmp_faults;
mod qmp_real;
mod support;
mod vm_isolation;
mod vm_lifecycle;
