//! The agent's `plugin "qemu" { config {} }` block.

use std::path::PathBuf;

use rmpv::Value;

use super::error::ConfigError;
use super::value::{self, DecodeError, Options};

/// Names of every plugin option, the keys of the plugin config schema.
pub const PLUGIN_OPTIONS: [&str; 3] = ["args_allowlist", "emulators_allowlist", "image_paths"];

/// The plugin config, with the options of Nomad's built-in qemu driver. `image_paths` and
/// `args_allowlist` exist in v1.6.5, and `emulators_allowlist` was added in v1.11.1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginConfig {
    /// `image_paths` (list of absolute dirs, default empty): dirs that `image_path` and host paths
    /// in `args` may point into, besides the allocation dir.
    pub image_paths: Vec<PathBuf>,
    /// `args_allowlist` (list of flags, default empty = any): the only flags `args` may contain.
    pub args_allowlist: Vec<String>,
    /// `emulators_allowlist` (list of targets, default empty = any): the only values `emulator`
    /// may take, like `x86_64`. Entries written as `qemu-system-x86_64` are stored as `x86_64`.
    pub emulators_allowlist: Vec<String>,
}

impl PluginConfig {
    /// Decodes the cty-msgpack bytes of the plugin config. Empty bytes give the defaults.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.is_empty() {
            return Ok(Self::default());
        }
        Self::from_value(&value::read(bytes, "plugin config")?)
    }

    /// Decodes an already parsed plugin config value.
    pub fn from_value(root: &Value) -> Result<Self, DecodeError> {
        let options = Options::new(root, "plugin config")?;
        Ok(Self {
            image_paths: options
                .string_list("image_paths")?
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            args_allowlist: options.string_list("args_allowlist")?,
            emulators_allowlist: options
                .string_list("emulators_allowlist")?
                .iter()
                .map(|name| super::emulator_target(name).to_owned())
                .collect(),
        })
    }

    /// Checks the rules that do not depend on a task, so that `SetConfig` can reject a bad agent
    /// config at start-up.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for dir in &self.image_paths {
            if !dir.is_absolute() {
                return Err(ConfigError::RelativeImagePathsEntry { dir: dir.clone() });
            }
        }
        for flag in &self.args_allowlist {
            if !flag.starts_with('-') {
                return Err(ConfigError::AllowlistEntryNotFlag {
                    entry: flag.clone(),
                });
            }
        }
        for target in &self.emulators_allowlist {
            super::check_token("emulators_allowlist", target)?;
        }
        Ok(())
    }
}
