//! Detection of the host's QEMU emulators, their version and whether KVM is usable.
//!
//! [`fingerprint`] runs every probe and returns a [`Fingerprint`] with the attributes of Nomad's
//! built-in qemu driver (`<prefix>.version`, `<prefix>.emulators`) plus `<prefix>.kvm`. The host
//! is reached only through [`Probes`], so tests point it at fixtures.

mod emulators;
mod kvm;
mod version;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

pub use emulators::{find_emulator_binary, find_emulators, split_search_path, EMULATOR_PREFIX};
pub use kvm::{probe_kvm, run_probe_guest, KvmStatus, ProbeError, KVM_PROBE_DEADLINE};
pub use version::parse_version;

/// Emulator target whose version is reported and that runs the KVM probe.
pub const PRIMARY_TARGET: &str = "x86_64";

/// Time `qemu-system-x86_64 -version` gets before it counts as failed.
pub const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// The driver's health, as Nomad's `FingerprintResponse` has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No usable emulator: the node does not offer the driver.
    Undetected,
    /// Emulators exist but are broken.
    Unhealthy,
    /// Tasks can run.
    Healthy,
}

/// A node attribute value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    /// A boolean attribute.
    Bool(bool),
    /// A string attribute.
    String(String),
}

/// The result of one fingerprint run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// The driver's health.
    pub health: Health,
    /// The health description: `Healthy`, or the reason it is not.
    pub description: String,
    /// Node attributes, keyed by their full name.
    pub attributes: BTreeMap<String, Attribute>,
    /// The KVM probe's result, when it ran.
    pub kvm: Option<KvmStatus>,
}

/// Host locations the probes read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probes {
    /// Dirs searched for emulators, in order, like `PATH`.
    pub search_path: Vec<PathBuf>,
    /// The KVM device.
    pub dev_kvm: PathBuf,
    /// The plugin's `emulators_allowlist` (empty = any).
    pub emulators_allowlist: Vec<String>,
    /// Time the KVM probe guest gets.
    pub kvm_deadline: Duration,
}

impl Probes {
    /// Returns probes for this host: the process's `PATH` and `/dev/kvm`.
    pub fn host(emulators_allowlist: Vec<String>) -> Self {
        let path = std::env::var_os("PATH").unwrap_or_default();
        Self {
            search_path: split_search_path(&path),
            dev_kvm: PathBuf::from("/dev/kvm"),
            emulators_allowlist,
            kvm_deadline: KVM_PROBE_DEADLINE,
        }
    }
}

/// Fingerprints the host, naming the attributes `<prefix>.<name>`, where `prefix` is like
/// `driver.qemu` for a plugin registered as `qemu`.
///
/// Takes up to [`VERSION_TIMEOUT`] plus the KVM probe's deadline. Callers that fingerprint
/// periodically may keep the KVM result, since it only changes when the host does.
pub async fn fingerprint(prefix: &str, probes: &Probes) -> Fingerprint {
    let targets = find_emulators(&probes.search_path, &probes.emulators_allowlist);
    if targets.is_empty() {
        tracing::info!(search_path = ?probes.search_path, "no allowed qemu-system-* emulator found");
        return not_ready(
            Health::Undetected,
            format!("no allowed {EMULATOR_PREFIX}* binary found on PATH"),
        );
    }

    let version_target = if targets.iter().any(|target| target == PRIMARY_TARGET) {
        PRIMARY_TARGET
    } else {
        &targets[0]
    };
    let Some(binary) = find_emulator_binary(&probes.search_path, version_target) else {
        return not_ready(
            Health::Unhealthy,
            format!("{EMULATOR_PREFIX}{version_target} disappeared while probing"),
        );
    };
    let version = match read_version(&binary).await {
        Ok(version) => version,
        Err(reason) => {
            tracing::warn!(binary = %binary.display(), %reason, "QEMU version probe failed");
            return not_ready(Health::Unhealthy, reason);
        }
    };

    let kvm = if version_target == PRIMARY_TARGET {
        probe_kvm(&binary, &probes.dev_kvm, probes.kvm_deadline).await
    } else {
        KvmStatus {
            usable: false,
            reason: format!("the KVM probe needs {EMULATOR_PREFIX}{PRIMARY_TARGET}"),
        }
    };
    tracing::info!(
        version = %version,
        emulators = %targets.join(","),
        kvm_usable = kvm.usable,
        kvm_reason = %kvm.reason,
        "fingerprinted QEMU"
    );

    let attributes = BTreeMap::from([
        (prefix.to_owned(), Attribute::Bool(true)),
        (format!("{prefix}.version"), Attribute::String(version)),
        (
            format!("{prefix}.emulators"),
            Attribute::String(targets.join(",")),
        ),
        (format!("{prefix}.kvm"), Attribute::Bool(kvm.usable)),
    ]);
    Fingerprint {
        health: Health::Healthy,
        description: "Healthy".to_owned(),
        attributes,
        kvm: Some(kvm),
    }
}

fn not_ready(health: Health, description: String) -> Fingerprint {
    Fingerprint {
        health,
        description,
        attributes: BTreeMap::new(),
        kvm: None,
    }
}

/// Runs `binary -version` and parses its output. The error is the health description.
async fn read_version(binary: &std::path::Path) -> Result<String, String> {
    let output = Command::new(binary)
        .arg("-version")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(VERSION_TIMEOUT, output).await {
        Ok(Ok(output)) => output,
        Ok(Err(error)) => {
            return Err(format!(
                "failed to run {} -version: {error}",
                binary.display()
            ))
        }
        Err(_) => {
            return Err(format!(
                "{} -version timed out after {VERSION_TIMEOUT:?}",
                binary.display()
            ))
        }
    };
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{} -version failed with {}",
            binary.display(),
            output.status
        ));
    }
    parse_version(&text)
        .ok_or_else(|| format!("failed to parse the QEMU version from {:?}", text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn probes(search_path: Vec<PathBuf>) -> Probes {
        Probes {
            search_path,
            dev_kvm: PathBuf::from("/nonexistent/kvm"),
            emulators_allowlist: Vec::new(),
            kvm_deadline: KVM_PROBE_DEADLINE,
        }
    }

    /// Writes a fake emulator that prints `output` for `-version`.
    fn fake_emulator(dir: &std::path::Path, target: &str, output: &str) {
        let path = dir.join(format!("{EMULATOR_PREFIX}{target}"));
        fs::write(&path, format!("#!/bin/sh\nprintf '%s' '{output}'\n")).expect("write script");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[tokio::test]
    async fn fingerprint_undetected_without_emulator() {
        let dir = tempfile::tempdir().expect("temp dir");
        let result = fingerprint("driver.qemu", &probes(vec![dir.path().to_owned()])).await;
        assert_eq!(result.health, Health::Undetected);
        assert!(result.attributes.is_empty());
    }

    #[tokio::test]
    async fn fingerprint_healthy_with_attributes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let version = fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/fingerprint/qemu-10.0-debian.txt"
        ))
        .expect("read fixture");
        fake_emulator(dir.path(), "x86_64", &version);
        fake_emulator(dir.path(), "aarch64", &version);

        let result = fingerprint("driver.qemu2", &probes(vec![dir.path().to_owned()])).await;
        assert_eq!(result.health, Health::Healthy);
        assert_eq!(
            result.attributes.get("driver.qemu2"),
            Some(&Attribute::Bool(true))
        );
        assert_eq!(
            result.attributes.get("driver.qemu2.version"),
            Some(&Attribute::String("10.0.2".into()))
        );
        assert_eq!(
            result.attributes.get("driver.qemu2.emulators"),
            Some(&Attribute::String("aarch64,x86_64".into()))
        );
        assert_eq!(
            result.attributes.get("driver.qemu2.kvm"),
            Some(&Attribute::Bool(false))
        );
        let kvm = result.kvm.expect("KVM probe ran");
        assert!(kvm.reason.contains("/nonexistent/kvm"), "{}", kvm.reason);
    }

    #[tokio::test]
    async fn fingerprint_unhealthy_on_bad_version() {
        let dir = tempfile::tempdir().expect("temp dir");
        fake_emulator(dir.path(), "x86_64", "QEMU emulator");
        let result = fingerprint("driver.qemu", &probes(vec![dir.path().to_owned()])).await;
        assert_eq!(result.health, Health::Unhealthy);
        assert!(
            result.description.contains("QEMU emulator"),
            "{}",
            result.description
        );
    }

    #[tokio::test]
    async fn fingerprint_respects_allowlist() {
        let dir = tempfile::tempdir().expect("temp dir");
        fake_emulator(dir.path(), "x86_64", "QEMU emulator version 7.2.22");
        let probes = Probes {
            emulators_allowlist: vec!["aarch64".into()],
            ..probes(vec![dir.path().to_owned()])
        };
        let result = fingerprint("driver.qemu", &probes).await;
        assert_eq!(result.health, Health::Undetected);
    }
}
