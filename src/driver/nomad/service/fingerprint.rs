//! The `Fingerprint` stream: driver health and node attributes from [`crate::fingerprint`].
//!
//! Nomad's client holds back node registration until every driver's first fingerprint
//! arrives, so the first response never waits for the KVM probe, which boots a guest and
//! takes up to its deadline. Until the probe ends, `driver.<name>.kvm` is left out. The probe
//! runs once per plugin process in the background, and its result is cached in a [`KvmCache`]
//! that StartTask also reads.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::driver::nomad::proto::drivers::{
    fingerprint_response::HealthState, FingerprintResponse,
};
use crate::driver::nomad::proto::structs::{attribute::Value as AttributeValue, Attribute};
use crate::fingerprint::{
    self, find_emulator_binary, probe_kvm, Fingerprint, Health, KvmStatus, Probes, EMULATOR_PREFIX,
    PRIMARY_TARGET,
};

/// Time between two fingerprints, as in Nomad's built-in qemu driver. Nomad updates the node
/// only when a fingerprint differs from the previous one.
pub const FINGERPRINT_PERIOD: Duration = Duration::from_secs(30);

/// Time beyond the probe's own deadline after which the probe counts as failed, should it
/// not return by itself.
const PROBE_GUARD: Duration = Duration::from_secs(1);

/// Stream type of the `Fingerprint` RPC.
pub type FingerprintStream =
    Pin<Box<dyn Stream<Item = Result<FingerprintResponse, Status>> + Send>>;

/// The KVM probe's result for this plugin process, `None` until the probe has ended.
///
/// Clones share the cache. The probe runs at most once: KVM usability changes only with the
/// host, so a new result needs a plugin restart.
#[derive(Debug, Clone)]
pub struct KvmCache {
    status: Arc<watch::Sender<Option<KvmStatus>>>,
    started: Arc<AtomicBool>,
}

impl Default for KvmCache {
    fn default() -> Self {
        Self {
            status: Arc::new(watch::channel(None).0),
            started: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl KvmCache {
    /// Returns a receiver of the probe's result, for a caller that checks `accelerator = "kvm"`
    /// or waits for the probe to end.
    pub fn subscribe(&self) -> watch::Receiver<Option<KvmStatus>> {
        self.status.subscribe()
    }

    /// Returns the probe's result, or `None` while it has not ended.
    pub fn current(&self) -> Option<KvmStatus> {
        self.status.borrow().clone()
    }

    /// Starts the probe in the background, unless it was started before.
    pub fn start_probe(&self, probes: &Probes) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let status = Arc::clone(&self.status);
        let probes = probes.clone();
        tokio::spawn(async move {
            let result = run_kvm_probe(&probes).await;
            tracing::info!(kvm_usable = result.usable, kvm_reason = %result.reason, "KVM probe ended");
            status.send_replace(Some(result));
        });
    }
}

async fn run_kvm_probe(probes: &Probes) -> KvmStatus {
    let Some(binary) = find_emulator_binary(&probes.search_path, PRIMARY_TARGET) else {
        return KvmStatus {
            usable: false,
            reason: format!("the KVM probe needs {EMULATOR_PREFIX}{PRIMARY_TARGET} on PATH"),
        };
    };
    let limit = probes.kvm_deadline + PROBE_GUARD;
    match tokio::time::timeout(
        limit,
        probe_kvm(&binary, &probes.dev_kvm, probes.kvm_deadline),
    )
    .await
    {
        Ok(status) => status,
        Err(_) => KvmStatus {
            usable: false,
            reason: format!("the KVM probe did not return within {limit:?}"),
        },
    }
}

/// Opens a stream that sends a fingerprint at once, then again when the KVM probe ends and
/// every [`FINGERPRINT_PERIOD`], until the client goes away or `shutdown` is cancelled. It
/// never ends on its own, because Nomad reopens an ended stream at once, in a busy loop.
///
/// Attributes are named `driver.<driver_name>.*`.
pub fn open(
    driver_name: &str,
    probes: Probes,
    kvm: KvmCache,
    shutdown: CancellationToken,
) -> FingerprintStream {
    let (sender, receiver) = mpsc::channel(1);
    let prefix = format!("driver.{driver_name}");

    tokio::spawn(async move {
        let mut kvm_status = kvm.subscribe();
        // The periodic run must not start a guest, so a zero deadline makes the probe in
        // `fingerprint::fingerprint` fail at once, and the cached result replaces it.
        // NOTE: `fingerprint::fingerprint` still logs that failed probe (kvm_usable=false) at
        // info level on every run. The cached result is in the "KVM probe ended" line.
        let quick = Probes {
            kvm_deadline: Duration::ZERO,
            ..probes.clone()
        };
        loop {
            let found = fingerprint::fingerprint(&prefix, &quick).await;
            if found.health != Health::Undetected {
                kvm.start_probe(&probes);
            }
            let status = kvm_status.borrow_and_update().clone();
            if sender
                .send(Ok(response(&prefix, found, status.as_ref())))
                .await
                .is_err()
            {
                break;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = sender.closed() => break,
                () = tokio::time::sleep(FINGERPRINT_PERIOD) => {}
                changed = kvm_status.changed() => {
                    if changed.is_err() {
                        // Unreachable while `kvm` is alive, but waiting on a closed channel
                        // would spin, so fall back to the period alone.
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = sender.closed() => break,
                            () = tokio::time::sleep(FINGERPRINT_PERIOD) => {}
                        }
                    }
                }
            }
        }
    });

    Box::pin(ReceiverStream::new(receiver))
}

/// Builds the response from a fingerprint whose KVM figure is replaced by the cached one:
/// `<prefix>.kvm` is left out while the probe has not ended.
fn response(prefix: &str, found: Fingerprint, kvm: Option<&KvmStatus>) -> FingerprintResponse {
    let health = match found.health {
        Health::Undetected => HealthState::Undetected,
        Health::Unhealthy => HealthState::Unhealthy,
        Health::Healthy => HealthState::Healthy,
    };
    let kvm_key = format!("{prefix}.kvm");
    let mut attributes: HashMap<String, Attribute> = found
        .attributes
        .into_iter()
        .filter(|(key, _)| *key != kvm_key)
        .map(|(key, value)| (key, attribute(value)))
        .collect();
    if let (Health::Healthy, Some(kvm)) = (found.health, kvm) {
        attributes.insert(kvm_key, attribute(fingerprint::Attribute::Bool(kvm.usable)));
    }
    FingerprintResponse {
        attributes,
        health: health.into(),
        health_description: found.description,
        err: String::new(),
    }
}

fn attribute(value: fingerprint::Attribute) -> Attribute {
    let value = match value {
        fingerprint::Attribute::Bool(value) => AttributeValue::BoolVal(value),
        fingerprint::Attribute::String(value) => AttributeValue::StringVal(value),
    };
    Attribute {
        value: Some(value),
        unit: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use futures::StreamExt;

    /// Writes a fake emulator that prints a QEMU version for `-version` and, when started as
    /// the KVM probe guest, sleeps for `probe_seconds`.
    fn fake_emulator(dir: &std::path::Path, probe_seconds: u32) {
        let path = dir.join(format!("{EMULATOR_PREFIX}{PRIMARY_TARGET}"));
        let script = format!(
            "#!/bin/sh\nif [ \"$1\" = -version ]; then echo 'QEMU emulator version 7.2.19'; exit 0; fi\nexec sleep {probe_seconds}\n"
        );
        fs::write(&path, script).expect("write script");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    fn probes(search_path: PathBuf, dev_kvm: PathBuf, kvm_deadline: Duration) -> Probes {
        Probes {
            search_path: vec![search_path],
            dev_kvm,
            emulators_allowlist: Vec::new(),
            kvm_deadline,
        }
    }

    fn bool_value(response: &FingerprintResponse, key: &str) -> Option<bool> {
        match response.attributes.get(key)?.value.as_ref()? {
            AttributeValue::BoolVal(value) => Some(*value),
            _ => None,
        }
    }

    #[tokio::test]
    async fn first_response_before_probe() {
        let dir = tempfile::tempdir().expect("temp dir");
        fake_emulator(dir.path(), 30);
        // A regular file opens like a device, so the probe starts the fake guest, which
        // hangs until the probe's deadline.
        let dev_kvm = dir.path().join("kvm");
        fs::write(&dev_kvm, "").expect("fake device");
        let kvm = KvmCache::default();
        let mut stream = open(
            "qemu",
            probes(dir.path().to_owned(), dev_kvm, Duration::from_secs(2)),
            kvm.clone(),
            CancellationToken::new(),
        );

        let started = tokio::time::Instant::now();
        let first = stream.next().await.expect("first").expect("ok");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(first.health, HealthState::Healthy as i32);
        assert_eq!(bool_value(&first, "driver.qemu"), Some(true));
        assert!(!first.attributes.contains_key("driver.qemu.kvm"));
        assert_eq!(kvm.current(), None);

        let second = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("second response after the probe")
            .expect("second")
            .expect("ok");
        assert_eq!(bool_value(&second, "driver.qemu.kvm"), Some(false));
        let status = kvm.current().expect("probe result cached");
        assert!(!status.usable);
        assert!(
            status.reason.contains("did not finish"),
            "{}",
            status.reason
        );
    }

    #[tokio::test]
    async fn undetected_without_emulator() {
        let dir = tempfile::tempdir().expect("temp dir");
        let kvm = KvmCache::default();
        let mut stream = open(
            "qemu",
            probes(
                dir.path().to_owned(),
                dir.path().join("kvm"),
                Duration::from_secs(2),
            ),
            kvm.clone(),
            CancellationToken::new(),
        );
        let first = stream.next().await.expect("first").expect("ok");
        assert_eq!(first.health, HealthState::Undetected as i32);
        assert!(first.attributes.is_empty());
        // Nothing to probe, so the probe never starts.
        let silent = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
        assert!(silent.is_err(), "{silent:?}");
        assert_eq!(kvm.current(), None);
    }

    #[tokio::test]
    async fn stream_ends_on_shutdown() {
        let dir = tempfile::tempdir().expect("temp dir");
        let shutdown = CancellationToken::new();
        let mut stream = open(
            "qemu",
            probes(
                dir.path().to_owned(),
                dir.path().join("kvm"),
                Duration::from_secs(2),
            ),
            KvmCache::default(),
            shutdown.clone(),
        );
        stream.next().await.expect("first").expect("ok");
        shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
        assert!(matches!(ended, Ok(None)), "{ended:?}");
    }

    #[test]
    fn unhealthy_keeps_reason() {
        let found = Fingerprint {
            health: Health::Unhealthy,
            description: "qemu-system-x86_64 -version timed out after 5s".into(),
            attributes: Default::default(),
            kvm: None,
        };
        let usable = KvmStatus {
            usable: true,
            reason: String::new(),
        };
        let response = response("driver.qemu", found, Some(&usable));
        assert_eq!(response.health, HealthState::Unhealthy as i32);
        assert!(response.health_description.contains("timed out"));
        assert!(response.attributes.is_empty());
    }
}
