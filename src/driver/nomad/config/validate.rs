//! Checks a task config against the plugin config and the host's file system.

use std::path::{Component, Path, PathBuf};

use super::args::check_args;
use super::error::ConfigError;
use super::plugin::PluginConfig;
use super::task::TaskConfig;
use super::{check_token, emulator_target};

/// Drive interfaces QEMU supports, the list of Nomad's built-in qemu driver.
pub const DRIVE_INTERFACES: &[&str] = &[
    "ide", "scsi", "sd", "mtd", "floppy", "pflash", "virtio", "none",
];

/// The task's directories on the host, as Nomad passes them in `TaskConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskDirs {
    /// The allocation dir (`alloc_dir`).
    pub alloc_dir: PathBuf,
    /// The task dir, `<alloc_dir>/<task name>`. QEMU runs with it as its working directory, so
    /// relative paths resolve against it.
    pub task_dir: PathBuf,
}

/// A task config that passed every check, with its image path resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedTask {
    /// The config as decoded. `emulator` contains the bare target, like `x86_64`.
    pub config: TaskConfig,
    /// `image_path` with symlinks resolved. QEMU gets this path, so a symlink swapped after the
    /// check cannot redirect it.
    pub image: PathBuf,
}

impl ValidatedTask {
    /// Returns the emulator binary's file name, like `qemu-system-x86_64`.
    pub fn emulator_binary(&self) -> String {
        format!("qemu-system-{}", self.config.emulator)
    }

    /// Returns the memory limit for the task's cgroup in MiB: guest RAM plus `memory_overhead`.
    pub fn memory_limit_mib(&self, guest_mib: u64) -> u64 {
        guest_mib.saturating_add(self.config.memory_overhead_mib)
    }
}

/// Dirs a task may read host files from, with symlinks resolved: the allocation dir and the
/// plugin's `image_paths`. Entries that do not exist are left out, since nothing is inside them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AllowedDirs {
    dirs: Vec<PathBuf>,
}

impl AllowedDirs {
    fn new(dirs: &TaskDirs, plugin: &PluginConfig) -> Self {
        let dirs = std::iter::once(&dirs.alloc_dir)
            .chain(&plugin.image_paths)
            .filter_map(|dir| dir.canonicalize().ok())
            .collect();
        Self { dirs }
    }

    pub(super) fn contains(&self, resolved: &Path) -> bool {
        self.dirs.iter().any(|dir| resolved.starts_with(dir))
    }

    pub(super) fn to_vec(&self) -> Vec<PathBuf> {
        self.dirs.clone()
    }
}

/// Validates `config` for a task with directories `dirs` under plugin config `plugin`.
///
/// Rules beyond those of Nomad's built-in driver: the image path must not contain a comma and
/// is checked after symlinks are resolved, names that go into QEMU option lists must be plain,
/// and with `args_allowlist` set the `args` must pass the rule in [`check_args`].
pub fn validate(
    mut config: TaskConfig,
    plugin: &PluginConfig,
    dirs: &TaskDirs,
) -> Result<ValidatedTask, ConfigError> {
    config.emulator = emulator_target(&config.emulator).to_owned();
    check_token("emulator", &config.emulator)?;
    let allowlist = &plugin.emulators_allowlist;
    if !allowlist.is_empty() && !allowlist.contains(&config.emulator) {
        return Err(ConfigError::EmulatorNotAllowed {
            emulator: config.emulator,
            allowlist: allowlist.clone(),
        });
    }

    check_token("machine_type", &config.machine_type)?;
    check_token("accelerator", &config.accelerator)?;
    if !DRIVE_INTERFACES.contains(&config.drive_interface.as_str()) {
        return Err(ConfigError::UnsupportedDriveInterface {
            value: config.drive_interface,
            allowed: DRIVE_INTERFACES,
        });
    }
    if config.boot_timeout.is_zero() {
        return Err(ConfigError::ZeroBootTimeout);
    }

    let allowed = AllowedDirs::new(dirs, plugin);
    let image = resolve_image(&config.image_path, &dirs.task_dir, &allowed)?;
    check_args(
        &config.args,
        &plugin.args_allowlist,
        &allowed,
        &dirs.task_dir,
    )?;

    Ok(ValidatedTask { config, image })
}

fn resolve_image(
    image_path: &str,
    task_dir: &Path,
    allowed: &AllowedDirs,
) -> Result<PathBuf, ConfigError> {
    if image_path.is_empty() {
        return Err(ConfigError::MissingImagePath);
    }
    if image_path.contains(',') {
        return Err(ConfigError::CommaInImagePath {
            path: image_path.to_owned(),
        });
    }

    let joined = task_dir.join(image_path);
    let resolved = joined
        .canonicalize()
        .map_err(|source| ConfigError::ImagePathNotFound {
            path: image_path.to_owned(),
            resolved: joined.clone(),
            source,
        })?;
    if !allowed.contains(&resolved) {
        return Err(ConfigError::ImagePathNotAllowed {
            path: image_path.to_owned(),
            resolved,
            allowed: allowed.to_vec(),
        });
    }
    Ok(resolved)
}

/// Resolves `path` against `base` the way the kernel would, also when its tail does not exist
/// yet: symlinks in the longest existing prefix are resolved and the rest is appended.
///
/// Returns `Err` with the unresolved path when the missing tail contains `..`, because whether
/// that escapes depends on entries that could be created later.
pub(super) fn resolve_lexically(base: &Path, path: &Path) -> Result<PathBuf, PathBuf> {
    let joined = base.join(path);
    let mut existing = joined.as_path();
    let mut tail = Vec::new();
    loop {
        if let Ok(resolved) = existing.canonicalize() {
            let mut result = resolved;
            for component in tail.iter().rev() {
                result.push(component);
            }
            return Ok(result);
        }
        let (Some(parent), Some(name)) = (existing.parent(), existing.components().next_back())
        else {
            return Err(joined);
        };
        match name {
            Component::Normal(name) => tail.push(name.to_owned()),
            Component::CurDir => {}
            _ => return Err(joined),
        }
        existing = parent;
    }
}
