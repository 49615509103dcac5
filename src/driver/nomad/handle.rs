//! The task handle's `driver_state`: what a later plugin process needs to recover a task.
//!
//! Nomad stores the handle returned by StartTask in its state DB and hands it back in
//! RecoverTask, after an agent restart without the task's `msgpack_driver_config`. So
//! everything StopTask, DestroyTask and TaskStats need is stored here, as JSON.

use std::path::PathBuf;
use std::time::SystemTime;

use rmpv::Value;
use serde::{Deserialize, Serialize};

use crate::driver::nomad::cgroup::TaskCgroups;
use crate::driver::vm::SavedVm;

/// Handle version of this driver. Nomad reserves 0, and the built-in qemu driver uses 1.
pub const HANDLE_VERSION: i32 = 2;

/// Handle version of Nomad's built-in qemu driver (v1.6.5 `drivers/qemu/driver.go`).
pub const BUILTIN_HANDLE_VERSION: i32 = 1;

/// Everything recovery needs about one task, stored as the handle's `driver_state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriverState {
    /// The VM's identity for [`crate::driver::vm::Vm::reattach`].
    pub vm: SavedVm,
    /// When QEMU was started.
    pub started_at: SystemTime,
    /// The task's `graceful_shutdown` option.
    pub graceful_shutdown: bool,
    /// The task dir, `<alloc_dir>/<task name>`.
    pub task_dir: PathBuf,
    /// Path of the QMP socket.
    pub qmp_socket: PathBuf,
    /// The emulator binary QEMU was started from.
    pub emulator: PathBuf,
    /// The `-machine accel=` value.
    pub accelerator: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The cgroup limit for QEMU in MiB: guest RAM plus `memory_overhead`.
    pub memory_limit_mib: u64,
    /// Reserved cores of the task.
    pub reserved_cores: Vec<u32>,
    /// The cgroups QEMU joined at start; DestroyTask removes the ones the driver created.
    pub cgroups: TaskCgroups,
}

/// Errors of decoding a task handle's `driver_state`.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The bytes are not this driver's JSON state.
    #[error("driver_state is not valid state of this driver")]
    Decode(#[source] serde_json::Error),
}

impl DriverState {
    /// Encodes the state for the handle's `driver_state`.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain structs with string keys into a Vec cannot fail.
        serde_json::to_vec(self).expect("DriverState serializes to JSON")
    }

    /// Decodes a handle's `driver_state`.
    pub fn decode(bytes: &[u8]) -> Result<Self, HandleError> {
        serde_json::from_slice(bytes).map_err(HandleError::Decode)
    }
}

/// Returns the QEMU pid from the `driver_state` of a built-in qemu driver handle: the
/// top-level `Pid` of its msgpack map, if present and valid.
pub fn builtin_qemu_pid(driver_state: &[u8]) -> Option<u32> {
    let value = rmpv::decode::read_value(&mut &driver_state[..]).ok()?;
    let Value::Map(entries) = value else {
        return None;
    };
    entries.iter().find_map(|(key, value)| {
        let is_pid = match key {
            Value::String(text) => text.as_str() == Some("Pid"),
            Value::Binary(bytes) => bytes.as_slice() == b"Pid",
            _ => false,
        };
        if !is_pid {
            return None;
        }
        value
            .as_u64()
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|pid| *pid > 1)
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn state() -> DriverState {
        DriverState {
            vm: SavedVm {
                name: "a1/web/0a1b2c3d".into(),
                pid: 4242,
                start_time: 987_654,
                dir: "/var/nomad/alloc/a1/web".into(),
            },
            started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            graceful_shutdown: true,
            task_dir: "/var/nomad/alloc/a1/web".into(),
            qmp_socket: "/var/nomad/alloc/a1/web/qmp.sock".into(),
            emulator: "/usr/bin/qemu-system-x86_64".into(),
            accelerator: "tcg".into(),
            memory_mib: 256,
            memory_limit_mib: 384,
            reserved_cores: vec![0, 1],
            cgroups: TaskCgroups::default(),
        }
    }

    #[test]
    fn state_round_trip() {
        let original = state();
        let decoded = DriverState::decode(&original.encode()).expect("decodes");
        assert_eq!(decoded, original);
    }

    #[test]
    fn state_rejects_garbage() {
        let error = DriverState::decode(b"\x83\xa3Pid").unwrap_err();
        assert!(error.to_string().contains("driver_state"), "{error}");
    }

    #[test]
    fn builtin_pid_from_msgpack() {
        let handle = Value::Map(vec![
            (
                Value::from("ReattachConfig"),
                Value::Map(vec![(Value::from("Pid"), Value::from(100))]),
            ),
            (Value::from("Pid"), Value::from(4321)),
            (Value::from("StartedAt"), Value::Nil),
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &handle).expect("encodes");
        assert_eq!(builtin_qemu_pid(&bytes), Some(4321));
    }

    #[test]
    fn builtin_pid_missing() {
        let handle = Value::Map(vec![(Value::from("Pid"), Value::from(0))]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &handle).expect("encodes");
        assert_eq!(builtin_qemu_pid(&bytes), None);
        assert_eq!(builtin_qemu_pid(b"{}"), None);
    }
}
