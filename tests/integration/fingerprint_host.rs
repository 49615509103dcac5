//! The fingerprint and the KVM probe against this host's real QEMU.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use nomad_driver_qemu::fingerprint::{
    fingerprint, probe_kvm, run_probe_guest, Attribute, Health, ProbeError, Probes,
    KVM_PROBE_DEADLINE,
};

use crate::support::{guest_slot, qemu_binary};

/// Serializes the tests of this module, so that the leftover-process check sees only the
/// probe of the test that holds it.
static PROBE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Extra time allowed past a probe's deadline for tokio's scheduling, not for the probe.
const SLACK: Duration = Duration::from_millis(500);

/// Lists the pids of processes whose command line mentions the probe's temporary dir.
fn probe_processes() -> Vec<u32> {
    let entries = std::fs::read_dir("/proc").expect("read /proc");
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains("qemu-kvm-probe-")
        })
        .collect()
}

#[tokio::test]
async fn probe_guest_passes_under_tcg() {
    let _serial = PROBE_LOCK.lock().await;
    let _slot = guest_slot().await;
    let elapsed = run_probe_guest(&qemu_binary(), "tcg", Duration::from_secs(20))
        .await
        .expect("the probe guest's code must run to completion under TCG");
    eprintln!("probe guest under TCG finished in {elapsed:?}");
    assert!(probe_processes().is_empty());
}

#[tokio::test]
async fn probe_kvm_bounded_and_reaped() {
    let _serial = PROBE_LOCK.lock().await;
    let _slot = guest_slot().await;
    let started = Instant::now();
    let status = probe_kvm(&qemu_binary(), "/dev/kvm".as_ref(), KVM_PROBE_DEADLINE).await;
    let elapsed = started.elapsed();
    eprintln!(
        "KVM probe: usable={} after {elapsed:?}: {}",
        status.usable, status.reason
    );

    assert!(
        elapsed <= KVM_PROBE_DEADLINE + SLACK,
        "probe took {elapsed:?}"
    );
    assert!(probe_processes().is_empty(), "probe left QEMU running");
}

#[tokio::test]
async fn probe_timeout_kills_guest() {
    let _serial = PROBE_LOCK.lock().await;
    // A stand-in emulator that never exits. As a script, its command line keeps the probe's
    // arguments, so the leftover check can find it.
    let dir = tempfile::tempdir().expect("temp dir");
    let emulator = dir.path().join("qemu-system-x86_64");
    std::fs::write(&emulator, "#!/bin/sh\nwhile :; do :; done\n").expect("write script");
    std::fs::set_permissions(&emulator, std::fs::Permissions::from_mode(0o755)).expect("chmod");

    let deadline = Duration::from_millis(300);
    let started = Instant::now();
    let result = run_probe_guest(&emulator, "tcg", deadline).await;
    let elapsed = started.elapsed();

    assert!(
        matches!(result, Err(ProbeError::TimedOut { .. })),
        "{result:?}"
    );
    assert!(elapsed <= deadline + SLACK, "probe took {elapsed:?}");
    assert!(
        probe_processes().is_empty(),
        "probe left its emulator running"
    );
}

#[tokio::test]
async fn fingerprint_host_qemu() {
    let _serial = PROBE_LOCK.lock().await;
    let _slot = guest_slot().await;
    let result = fingerprint("driver.qemu", &Probes::host(Vec::new())).await;
    eprintln!("{result:#?}");

    assert_eq!(result.health, Health::Healthy, "{}", result.description);
    let Some(Attribute::String(emulators)) = result.attributes.get("driver.qemu.emulators") else {
        panic!("no emulators attribute: {result:?}");
    };
    assert!(
        emulators.split(',').any(|target| target == "x86_64"),
        "{emulators}"
    );
    assert!(matches!(
        result.attributes.get("driver.qemu.version"),
        Some(Attribute::String(_))
    ));
    assert!(matches!(
        result.attributes.get("driver.qemu.kvm"),
        Some(Attribute::Bool(_))
    ));
}
