//! Task and plugin configuration: decoding from Nomad's cty-msgpack, validation, and the
//! mapping to a QEMU command line.
//!
//! The flow for a task is [`TaskConfig::decode`], then [`validate`] against the
//! [`PluginConfig`] and the task's dirs, then [`build_command_line`] with the task's
//! [`TaskContext`]. Every rejection is a [`ConfigError`] or a [`DecodeError`].

mod args;
mod command;
mod error;
mod plugin;
mod task;
mod validate;
mod value;

#[cfg(test)]
mod tests;

pub use command::{
    build_command_line, uses_kvm, DnsConfig, TaskContext, TaskPort, GUEST_AGENT_SOCKET_NAME,
    IMAGE_DRIVE_ID, MIN_MEMORY_MIB, USER_NETDEV_ID,
};
pub use error::ConfigError;
pub use plugin::{PluginConfig, PLUGIN_OPTIONS};
pub use task::{
    TaskConfig, DEFAULT_ACCELERATOR, DEFAULT_BOOT_TIMEOUT, DEFAULT_DRIVE_INTERFACE,
    DEFAULT_EMULATOR, DEFAULT_MACHINE_TYPE, DEFAULT_MEMORY_OVERHEAD_MIB, TASK_OPTIONS,
};
pub use validate::{validate, TaskDirs, ValidatedTask, DRIVE_INTERFACES};
pub use value::DecodeError;

/// Returns the emulator target of `name`, accepting `x86_64` and `qemu-system-x86_64` alike as
/// Nomad's built-in driver does.
fn emulator_target(name: &str) -> &str {
    name.strip_prefix("qemu-system-").unwrap_or(name)
}

/// Checks that `value` of `option` is a plain name that cannot break out of a QEMU option list.
fn check_token(option: &'static str, value: &str) -> Result<(), ConfigError> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
    if value.is_empty() || !value.chars().all(plain) {
        return Err(ConfigError::InvalidName {
            option,
            value: value.to_owned(),
        });
    }
    Ok(())
}
