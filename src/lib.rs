//! A Nomad task driver that runs QEMU virtual machines and controls each one over its own
//! QMP socket.
//!
//! The crate is layered from the wire up:
//!
//! * [`qmp`]: the QEMU Machine Protocol codec, an async client and typed events.
//! * [`driver::vm`]: one state machine per VM (spawn, graceful stop, exit detection, reattach,
//!   stats), built only on [`qmp`] and the host's process APIs.
//! * [`driver::nomad`]: the Nomad plugin adapter (go-plugin handshake, gRPC services, task
//!   config), built only on [`driver::vm`] and [`fingerprint`].
//! * [`fingerprint`]: detection of the host's QEMU emulators and whether KVM is usable.

pub mod cli;
pub mod driver;
pub mod fingerprint;
pub mod qmp;
mod report;
