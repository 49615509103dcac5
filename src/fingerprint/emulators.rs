//! Discovery of `qemu-system-*` emulators on the search path.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// File name prefix of QEMU system emulators.
pub const EMULATOR_PREFIX: &str = "qemu-system-";

/// Lists the emulator targets (like `x86_64`) in the first dir of `search_path` that has any
/// executable `qemu-system-*` file, sorted, keeping only those in `allowlist` when it is set.
///
/// Stopping at the first such dir is what Nomad's built-in driver does, so that one QEMU
/// installation is reported, not a mix of several.
pub fn find_emulators(search_path: &[PathBuf], allowlist: &[String]) -> Vec<String> {
    for dir in search_path {
        let mut targets = emulators_in(dir);
        if targets.is_empty() {
            continue;
        }
        targets.retain(|target| allowlist.is_empty() || allowlist.contains(target));
        targets.sort();
        return targets;
    }
    Vec::new()
}

/// Returns the path of `qemu-system-TARGET` in the first dir of `search_path` that has it.
pub fn find_emulator_binary(search_path: &[PathBuf], target: &str) -> Option<PathBuf> {
    search_path
        .iter()
        .map(|dir| dir.join(format!("{EMULATOR_PREFIX}{target}")))
        .find(|path| is_executable(path))
}

/// Splits a `PATH` value into its dirs.
pub fn split_search_path(path: &std::ffi::OsStr) -> Vec<PathBuf> {
    std::env::split_paths(path).collect()
}

fn emulators_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| is_executable(&entry.path()))
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let target = name.strip_prefix(EMULATOR_PREFIX)?;
            (!target.is_empty()).then(|| target.to_owned())
        })
        .collect()
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|metadata| metadata.is_file() && metadata.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn make_file(dir: &Path, name: &str, mode: u32) {
        let path = dir.join(name);
        fs::write(&path, b"#!/bin/sh\n").expect("write file");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn find_first_dir_only() {
        let root = tempfile::tempdir().expect("temp dir");
        let (empty, first, second) = (
            root.path().join("a"),
            root.path().join("b"),
            root.path().join("c"),
        );
        for dir in [&empty, &first, &second] {
            fs::create_dir(dir).expect("create dir");
        }
        make_file(&first, "qemu-system-x86_64", 0o755);
        make_file(&first, "qemu-system-aarch64", 0o755);
        make_file(&first, "qemu-system-riscv64", 0o644);
        make_file(&first, "qemu-img", 0o755);
        make_file(&second, "qemu-system-ppc64", 0o755);

        let search_path = vec![root.path().join("missing"), empty, first.clone(), second];
        assert_eq!(find_emulators(&search_path, &[]), ["aarch64", "x86_64"]);
        assert_eq!(
            find_emulators(&search_path, &["x86_64".to_owned()]),
            ["x86_64"]
        );
        assert_eq!(
            find_emulator_binary(&search_path, "x86_64"),
            Some(first.join("qemu-system-x86_64"))
        );
        assert_eq!(find_emulator_binary(&search_path, "riscv64"), None);
    }

    #[test]
    fn find_none_on_empty_path() {
        assert!(find_emulators(&[], &[]).is_empty());
    }
}
