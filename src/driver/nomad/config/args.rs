//! The `args_allowlist` rule, which keeps `args` from attaching host files the operator did not
//! allow.
//!
//! With an allowlist set, every token of `args` must be one of:
//!
//! * a flag (a token starting with `-`) that is in the allowlist, compared exactly, or
//! * the single token right after an allowed flag, taken as that flag's value.
//!
//! Any other token is rejected, because QEMU reads a token that is neither a flag nor a flag's
//! value as a disk image. A value token may still name host files, as in
//! `-drive file=/etc/shadow` or `-serial file:/etc/passwd`, so each value is split at the
//! separators of QEMU's option syntax (`,` `=` `:`), of JSON and of whitespace. Every piece that
//! contains a `/` or names an existing entry in the task dir is then resolved like a path
//! (relative to the task dir, symlinks resolved) and must lie in the allocation dir or a dir of
//! the plugin's `image_paths`. The whole token is checked the same way. A piece whose missing
//! tail contains `..` is rejected, since later entries decide where it leads.
//!
//! Without an allowlist, `args` pass unchecked, as in Nomad's built-in qemu driver.

use std::path::Path;

use super::error::ConfigError;
use super::validate::{resolve_lexically, AllowedDirs};

/// Characters that end a path inside a QEMU option value.
const SEPARATORS: &[char] = &[
    ',', '=', ':', '"', '\'', '{', '}', '[', ']', ' ', '\t', '\n', '\r', ';',
];

/// Applies the allowlist rule described in the module docs to `args`.
pub(super) fn check_args(
    args: &[String],
    allowlist: &[String],
    allowed: &AllowedDirs,
    task_dir: &Path,
) -> Result<(), ConfigError> {
    if allowlist.is_empty() {
        return Ok(());
    }

    let mut follows_flag = false;
    for (index, arg) in args.iter().enumerate() {
        if arg.starts_with('-') {
            if !allowlist.contains(arg) {
                return Err(ConfigError::ArgNotAllowed {
                    index,
                    arg: arg.clone(),
                    allowlist: allowlist.to_vec(),
                });
            }
            follows_flag = true;
            continue;
        }

        if !follows_flag {
            return Err(ConfigError::PositionalArg {
                index,
                arg: arg.clone(),
            });
        }
        follows_flag = false;
        check_value_paths(index, arg, allowed, task_dir)?;
    }
    Ok(())
}

fn check_value_paths(
    index: usize,
    arg: &str,
    allowed: &AllowedDirs,
    task_dir: &Path,
) -> Result<(), ConfigError> {
    let pieces = std::iter::once(arg).chain(arg.split(SEPARATORS));
    for piece in pieces.filter(|piece| !piece.is_empty()) {
        let path = Path::new(piece);
        let looks_like_path = piece.contains('/') || task_dir.join(path).symlink_metadata().is_ok();
        if !looks_like_path {
            continue;
        }

        let resolved = resolve_lexically(task_dir, path);
        let inside = matches!(&resolved, Ok(resolved) if allowed.contains(resolved));
        if !inside {
            return Err(ConfigError::ArgPathNotAllowed {
                index,
                arg: arg.to_owned(),
                path: resolved.unwrap_or_else(|unresolved| unresolved),
                allowed: allowed.to_vec(),
            });
        }
    }
    Ok(())
}
