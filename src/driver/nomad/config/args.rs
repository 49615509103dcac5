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
//! tail contains `..` is rejected, since later entries decide where it leads. Relative paths
//! are checked against the task dir because QEMU runs with it as its working directory.
//!
//! QEMU also reads JSON, where `\/` and `\u002f` spell a `/`: a value that starts with `{` (as
//! in `-device {...}`) or contains the `json:` pseudo-protocol is parsed, and every string in it
//! is checked like a piece. A value that looks like JSON but does not parse is rejected.
//!
//! Some tokens are rejected even when their flag is allowlisted, because they run host programs
//! or load host code into QEMU no matter where the files lie: the flags in [`DENIED_FLAGS`], any
//! value containing `exec:` (migration and character devices that run a shell command), and the
//! `script=`, `downscript=` and `helper=` options of tap and bridge networks.
//!
//! Without an allowlist, `args` pass unchecked, as in Nomad's built-in qemu driver.

use std::path::Path;

use serde_json::Value;

use super::error::ConfigError;
use super::validate::{resolve_lexically, AllowedDirs};

/// Characters that end a path inside a QEMU option value.
const SEPARATORS: &[char] = &[
    ',', '=', ':', '"', '\'', '{', '}', '[', ']', ' ', '\t', '\n', '\r', ';',
];

/// Flags rejected with an allowlist set, even when listed: `-readconfig` reads options that
/// bypass these checks, `-L` points QEMU's firmware search at a host dir, `-plugin` loads a
/// shared library into QEMU, and `-daemonize` detaches QEMU from the driver.
const DENIED_FLAGS: &[&str] = &["-readconfig", "-L", "-plugin", "-daemonize"];

/// Option keys of tap and bridge networks that name a host program QEMU runs as its own user.
const PROGRAM_KEYS: &[&str] = &["script", "downscript", "helper"];

/// Reason given when a [`PROGRAM_KEYS`] option is rejected.
const PROGRAM_REASON: &str = "script=, downscript= and helper= make QEMU run a host program";

/// Marker of QEMU's JSON pseudo-protocol inside an option value, as in `file=json:{...}`.
const JSON_PROTOCOL: &str = "json:";

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
            // QEMU accepts `--flag` for `-flag`.
            let flag = match arg.strip_prefix('-') {
                Some(rest) if rest.starts_with('-') => rest,
                _ => arg.as_str(),
            };
            if DENIED_FLAGS.contains(&flag) {
                return Err(ConfigError::ArgDenied {
                    index,
                    arg: arg.clone(),
                    reason: "it reads config, firmware or code from the host or detaches QEMU",
                });
            }
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
    let value = Checked {
        index,
        arg,
        allowed,
        task_dir,
    };
    value.check_text(arg)
}

/// Reports whether option `key` of [`PROGRAM_KEYS`] with `value` runs no program: only
/// `script=no` and `downscript=no` do.
fn runs_nothing(key: &str, value: Option<&str>) -> bool {
    key != "helper" && value == Some("no")
}

/// One value token of `args` under check, with what the checks need.
struct Checked<'a> {
    index: usize,
    arg: &'a str,
    allowed: &'a AllowedDirs,
    task_dir: &'a Path,
}

impl Checked<'_> {
    /// Checks `text`, the token or a string inside its JSON, for denied options and paths.
    fn check_text(&self, text: &str) -> Result<(), ConfigError> {
        if text.contains("exec:") {
            return Err(self.denied("exec: makes QEMU run a host shell command"));
        }
        for (key, value) in text.split(',').filter_map(|option| option.split_once('=')) {
            let plain = key.rsplit('.').next().unwrap_or(key);
            if PROGRAM_KEYS.contains(&plain) && !runs_nothing(plain, Some(value)) {
                return Err(self.denied(PROGRAM_REASON));
            }
        }

        if text.trim_start().starts_with('{') {
            let json =
                serde_json::from_str::<Value>(text).map_err(|source| self.invalid_json(source))?;
            self.check_json(&json)?;
        }
        for (start, _) in text.match_indices(JSON_PROTOCOL) {
            self.check_json_protocol(&text[start + JSON_PROTOCOL.len()..])?;
        }

        let pieces = std::iter::once(text).chain(text.split(SEPARATORS));
        for piece in pieces.filter(|piece| !piece.is_empty()) {
            self.check_piece(piece)?;
        }
        Ok(())
    }

    /// Checks the JSON after `json:`. Inside an option list QEMU first turns `,,` into `,`
    /// and the JSON ends where the value does; both readings are checked when both parse.
    fn check_json_protocol(&self, rest: &str) -> Result<(), ConfigError> {
        let undoubled = rest.replace(",,", ",");
        let mut parsed = 0;
        let mut first_error = None;
        for candidate in [undoubled.as_str(), rest] {
            let mut stream = serde_json::Deserializer::from_str(candidate).into_iter::<Value>();
            match stream.next() {
                Some(Ok(json)) => {
                    parsed += 1;
                    self.check_json(&json)?;
                }
                Some(Err(error)) => {
                    first_error.get_or_insert(error);
                }
                None => {}
            }
        }
        match (parsed, first_error) {
            (0, Some(error)) => Err(self.invalid_json(error)),
            (0, None) => Err(self.denied("json: must be followed by a JSON object")),
            _ => Ok(()),
        }
    }

    /// Checks every string in `json`, keys included, like a value of its own.
    fn check_json(&self, json: &Value) -> Result<(), ConfigError> {
        match json {
            Value::String(text) => self.check_text(text),
            Value::Array(items) => items.iter().try_for_each(|item| self.check_json(item)),
            Value::Object(entries) => entries.iter().try_for_each(|(key, value)| {
                let plain = key.rsplit('.').next().unwrap_or(key);
                if PROGRAM_KEYS.contains(&plain) && !runs_nothing(plain, value.as_str()) {
                    return Err(self.denied(PROGRAM_REASON));
                }
                self.check_text(key)?;
                self.check_json(value)
            }),
            Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
        }
    }

    fn check_piece(&self, piece: &str) -> Result<(), ConfigError> {
        let path = Path::new(piece);
        let looks_like_path =
            piece.contains('/') || self.task_dir.join(path).symlink_metadata().is_ok();
        if !looks_like_path {
            return Ok(());
        }

        let resolved = resolve_lexically(self.task_dir, path);
        let inside = matches!(&resolved, Ok(resolved) if self.allowed.contains(resolved));
        if !inside {
            return Err(ConfigError::ArgPathNotAllowed {
                index: self.index,
                arg: self.arg.to_owned(),
                path: resolved.unwrap_or_else(|unresolved| unresolved),
                allowed: self.allowed.to_vec(),
            });
        }
        Ok(())
    }

    fn denied(&self, reason: &'static str) -> ConfigError {
        ConfigError::ArgDenied {
            index: self.index,
            arg: self.arg.to_owned(),
            reason,
        }
    }

    fn invalid_json(&self, source: serde_json::Error) -> ConfigError {
        ConfigError::ArgInvalidJson {
            index: self.index,
            arg: self.arg.to_owned(),
            source,
        }
    }
}
