//! The `Fingerprint` stream: driver health and node attributes.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::driver::nomad::proto::drivers::{
    fingerprint_response::HealthState, FingerprintResponse,
};
use crate::driver::nomad::proto::structs::{attribute::Value as AttributeValue, Attribute};

/// Time between two fingerprints, as in Nomad's built-in qemu driver. Nomad updates the node
/// only when a fingerprint differs from the previous one.
pub const FINGERPRINT_PERIOD: Duration = Duration::from_secs(30);

/// Time allowed for `qemu-system-x86_64 --version`.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// The emulator probed for health.
// TODO: report every emulator and KVM through `crate::fingerprint` once that module exists.
const PROBED_EMULATOR: &str = "qemu-system-x86_64";

/// Stream type of the `Fingerprint` RPC.
pub type FingerprintStream =
    Pin<Box<dyn Stream<Item = Result<FingerprintResponse, Status>> + Send>>;

/// Opens a stream that sends a fingerprint at once, then every [`FINGERPRINT_PERIOD`], until
/// the client goes away or `shutdown` is cancelled. It never ends on its own, because Nomad
/// reopens an ended stream at once, in a busy loop.
pub fn open(driver_name: String, shutdown: CancellationToken) -> FingerprintStream {
    let (sender, receiver) = mpsc::channel(1);

    tokio::spawn(async move {
        loop {
            let fingerprint = probe(&driver_name).await;
            if sender.send(Ok(fingerprint)).await.is_err() {
                break;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = sender.closed() => break,
                () = tokio::time::sleep(FINGERPRINT_PERIOD) => {}
            }
        }
    });

    Box::pin(ReceiverStream::new(receiver))
}

/// Runs the emulator's `--version` and builds the fingerprint from the result.
async fn probe(driver_name: &str) -> FingerprintResponse {
    let output = Command::new(PROBED_EMULATOR)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();

    let output = match tokio::time::timeout(VERSION_TIMEOUT, output).await {
        Ok(Ok(output)) if output.status.success() => output,
        Ok(Ok(output)) => {
            tracing::warn!(emulator = PROBED_EMULATOR, status = %output.status, "emulator version check failed");
            return unhealthy(format!(
                "{PROBED_EMULATOR} --version failed with {}",
                output.status
            ));
        }
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!(emulator = PROBED_EMULATOR, "emulator not found on PATH");
            return FingerprintResponse {
                health: HealthState::Undetected.into(),
                health_description: format!(
                    "{PROBED_EMULATOR} not found on PATH: install QEMU (Debian: apt-get install qemu-system-x86)"
                ),
                ..FingerprintResponse::default()
            };
        }
        Ok(Err(error)) => {
            tracing::warn!(emulator = PROBED_EMULATOR, error = %error, "emulator version check failed");
            return unhealthy(format!(
                "failed to run {PROBED_EMULATOR} --version: {error}"
            ));
        }
        Err(_) => {
            tracing::warn!(
                emulator = PROBED_EMULATOR,
                timeout_s = VERSION_TIMEOUT.as_secs(),
                "emulator version check timed out"
            );
            return unhealthy(format!(
                "{PROBED_EMULATOR} --version timed out after {} s",
                VERSION_TIMEOUT.as_secs()
            ));
        }
    };

    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut attributes = HashMap::new();
    attributes.insert(format!("driver.{driver_name}"), bool_attribute(true));
    if let Some(version) = parse_version(&stdout) {
        attributes.insert(
            format!("driver.{driver_name}.version"),
            string_attribute(version),
        );
    }

    FingerprintResponse {
        attributes,
        health: HealthState::Healthy.into(),
        health_description: "Healthy".to_owned(),
        ..FingerprintResponse::default()
    }
}

fn unhealthy(description: String) -> FingerprintResponse {
    FingerprintResponse {
        health: HealthState::Unhealthy.into(),
        health_description: description,
        ..FingerprintResponse::default()
    }
}

/// Extracts `7.2.1` from `QEMU emulator version 7.2.1 (Debian 1:7.2+dfsg-7)`.
fn parse_version(output: &str) -> Option<&str> {
    let rest = output.split_once("version ")?.1;
    let version = rest.split(|c: char| c.is_whitespace()).next()?;
    (!version.is_empty()).then_some(version)
}

fn bool_attribute(value: bool) -> Attribute {
    Attribute {
        value: Some(AttributeValue::BoolVal(value)),
        unit: String::new(),
    }
}

fn string_attribute(value: &str) -> Attribute {
    Attribute {
        value: Some(AttributeValue::StringVal(value.to_owned())),
        unit: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_from_qemu_output() {
        let debian =
            "QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright (c) 2003-2022";
        assert_eq!(parse_version(debian), Some("7.2.19"));
        assert_eq!(
            parse_version("QEMU emulator version 10.0.2\n"),
            Some("10.0.2")
        );
        assert_eq!(parse_version("garbage"), None);
    }
}
