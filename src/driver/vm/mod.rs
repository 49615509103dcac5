//! One VM under control: QEMU command line, process, QMP session and lifecycle.

pub mod argv;
pub mod state;
pub mod sys;
