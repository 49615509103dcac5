//! The task's `config {}` block.

use std::collections::BTreeMap;
use std::time::Duration;

use rmpv::Value;

use super::value::{self, DecodeError, Options};

/// Default emulator target, the suffix of `qemu-system-x86_64`.
pub const DEFAULT_EMULATOR: &str = "x86_64";
/// Default machine type.
pub const DEFAULT_MACHINE_TYPE: &str = "pc";
/// Default drive interface.
pub const DEFAULT_DRIVE_INTERFACE: &str = "ide";
/// Default accelerator.
pub const DEFAULT_ACCELERATOR: &str = "tcg";
/// Default time to wait for the QMP greeting after QEMU starts.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default memory budgeted for QEMU itself on top of guest RAM, in MiB.
///
/// An estimate: an idle 128 MiB guest under TCG had an RSS of about 220 MiB with Debian's QEMU
/// 7.2 and 10.0, so QEMU's own share was about 100 MiB.
pub const DEFAULT_MEMORY_OVERHEAD_MIB: u64 = 128;

/// Names of every task option, the keys of the task config schema.
pub const TASK_OPTIONS: [&str; 11] = [
    "accelerator",
    "args",
    "boot_timeout",
    "drive_interface",
    "emulator",
    "graceful_shutdown",
    "guest_agent",
    "image_path",
    "machine_type",
    "memory_overhead",
    "port_map",
];

/// A task's driver config, decoded with defaults applied but not yet validated.
///
/// The first nine options have the names, types, defaults and meaning of Nomad's built-in qemu
/// driver. `image_path`, `drive_interface`, `accelerator`, `graceful_shutdown`, `guest_agent`,
/// `args` and `port_map` exist in v1.6.5, and `emulator` and `machine_type` were added in v1.11.1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskConfig {
    /// `image_path` (string, required): the disk image, absolute or relative to the task dir.
    pub image_path: String,
    /// `emulator` (string, default `x86_64`): the target of the `qemu-system-TARGET` binary. The
    /// full binary name is accepted too.
    pub emulator: String,
    /// `machine_type` (string, default `pc`): the `-machine type=` value.
    pub machine_type: String,
    /// `drive_interface` (string, default `ide`): the `-drive if=` value of the image.
    pub drive_interface: String,
    /// `accelerator` (string, default `tcg`): the `-machine accel=` value.
    pub accelerator: String,
    /// `graceful_shutdown` (bool, default false): on stop, ask the guest to power off and wait up
    /// to the task's `kill_timeout` before forcing QEMU to quit.
    pub graceful_shutdown: bool,
    /// `guest_agent` (bool, default false): expose the QEMU guest agent as `qa.sock` in the task
    /// dir.
    pub guest_agent: bool,
    /// `args` (list of strings, default empty): extra QEMU arguments, appended verbatim.
    pub args: Vec<String>,
    /// `port_map` (list of maps from port label to guest port, default empty): host port of each
    /// label forwarded to that guest port, over TCP and UDP.
    pub port_map: BTreeMap<String, u16>,
    /// `boot_timeout` (duration string, default `30s`): how long to wait for QEMU's QMP greeting
    /// before the start fails. New in this driver.
    pub boot_timeout: Duration,
    /// `memory_overhead` (number of MiB, default 128): memory for QEMU itself, added to the
    /// task's `memory` in the task's cgroup limit. New in this driver.
    pub memory_overhead_mib: u64,
}

impl TaskConfig {
    /// Decodes the cty-msgpack bytes of a task's `config {}` block.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Self::from_value(&value::read(bytes, "task config")?)
    }

    /// Decodes an already parsed task config value.
    pub fn from_value(root: &Value) -> Result<Self, DecodeError> {
        let options = Options::new(root, "task config")?;
        let text_or = |key: &str, default: &str| -> Result<String, DecodeError> {
            Ok(options
                .string(key)?
                .filter(|text| !text.is_empty())
                .unwrap_or_else(|| default.to_owned()))
        };

        Ok(Self {
            image_path: options.string("image_path")?.unwrap_or_default(),
            emulator: text_or("emulator", DEFAULT_EMULATOR)?,
            machine_type: text_or("machine_type", DEFAULT_MACHINE_TYPE)?,
            drive_interface: text_or("drive_interface", DEFAULT_DRIVE_INTERFACE)?,
            accelerator: text_or("accelerator", DEFAULT_ACCELERATOR)?,
            graceful_shutdown: options.bool("graceful_shutdown")?.unwrap_or(false),
            guest_agent: options.bool("guest_agent")?.unwrap_or(false),
            args: options.string_list("args")?,
            port_map: options.port_map("port_map")?,
            boot_timeout: options
                .duration("boot_timeout")?
                .unwrap_or(DEFAULT_BOOT_TIMEOUT),
            memory_overhead_mib: options
                .u64("memory_overhead")?
                .unwrap_or(DEFAULT_MEMORY_OVERHEAD_MIB),
        })
    }
}
