//! Errors of the Nomad adapter and their mapping to gRPC statuses.
//!
//! [`to_status`] is the only place where an error becomes a [`tonic::Status`]. A failed start
//! that may succeed on a later attempt carries a `RecoverableError` detail, the one signal
//! Nomad's client reads to apply the task's restart policy instead of failing the task at once
//! (Nomad v1.6.5 `helper/pluginutils/grpcutils/utils.go`).

use prost::Message;
use tonic::{Code, Status};

use super::config::{ConfigError, DecodeError};
use super::handle::HandleError;
use super::proto::{rpc, structs::RecoverableError};
use crate::driver::vm::VmError;
use crate::report::error_chain;

/// Type URL of the `RecoverableError` detail, as Nomad's client matches it.
pub const RECOVERABLE_ERROR_TYPE_URL: &str =
    "type.googleapis.com/hashicorp.nomad.plugins.shared.structs.RecoverableError";

/// A failed plugin or driver RPC.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The plugin `config` block could not be decoded.
    #[error("invalid plugin config")]
    InvalidPluginConfig(#[source] DecodeError),

    /// The plugin `config` block decoded but breaks a rule.
    #[error("invalid plugin config")]
    PluginConfigRejected(#[source] ConfigError),

    /// A request lacks a field that Nomad always sends.
    #[error("invalid request: missing field {field}")]
    MissingField {
        /// Field name as in the protobuf message, for example `task.id`.
        field: &'static str,
    },

    /// No task with this id is known to this plugin process.
    #[error("task {task_id} not found")]
    TaskNotFound {
        /// The task id Nomad sent.
        task_id: String,
    },

    /// `ExecTask` and `ExecTaskStreaming` have no VM equivalent in this driver.
    #[error(
        "exec is not supported by the qemu driver: the guest is a separate machine; \
         reach it over the network or the QEMU guest agent instead"
    )]
    ExecUnsupported,

    /// `CreateNetwork` and `DestroyNetwork` are only called for drivers that report
    /// `must_create_network`, which this one does not.
    #[error("the qemu driver does not create network namespaces: Nomad creates them")]
    NetworkUnsupported,

    /// A StartTask for this id is still in progress.
    #[error("task {task_id} is already starting: wait for the first StartTask to finish")]
    TaskStarting {
        /// The task id Nomad sent.
        task_id: String,
    },

    /// The task handle was created by Nomad's built-in qemu driver.
    #[error(
        "task {task_id} was started by Nomad's built-in qemu driver, whose state this driver \
         cannot adopt; {outcome}, and Nomad will start the task again under this driver"
    )]
    BuiltinHandle {
        /// The task id of the handle.
        task_id: String,
        /// What happened to the built-in driver's QEMU.
        outcome: String,
    },

    /// The task handle has a version this driver does not write.
    #[error(
        "task {task_id} has a handle of version {version}, expected {expected}: \
         it was not created by this driver; Nomad will start the task again"
    )]
    UnsupportedHandleVersion {
        /// The task id of the handle.
        task_id: String,
        /// The handle's version.
        version: i32,
        /// The version this driver writes.
        expected: i32,
    },

    /// The handle's `driver_state` could not be decoded.
    #[error("failed to recover task {task_id}: invalid task handle")]
    InvalidHandle {
        /// The task id of the handle.
        task_id: String,
        /// Why decoding failed.
        #[source]
        source: HandleError,
    },

    /// The task's VM is alive but could not be adopted.
    #[error("failed to recover task {task_id}; {outcome}")]
    RecoverFailed {
        /// The task id of the handle.
        task_id: String,
        /// What happened to the VM that could not be adopted.
        outcome: String,
        /// Why adopting failed.
        #[source]
        source: Box<VmError>,
    },

    /// Stopping or killing the task's VM failed.
    #[error("failed to stop task {task_id}")]
    StopFailed {
        /// The task id Nomad sent.
        task_id: String,
        /// What failed.
        #[source]
        source: Box<VmError>,
    },

    /// SignalTask named a signal this driver has no VM action for.
    #[error(
        "signal {signal:?} is not supported by the qemu driver: use SIGSTOP (pause the vCPUs), \
         SIGCONT (resume them), or SIGINT, SIGTERM, SIGPWR (press the ACPI power button once); \
         stop the task with Nomad to force the VM off"
    )]
    UnsupportedSignal {
        /// The signal as Nomad sent it.
        signal: String,
    },

    /// Delivering a supported signal failed.
    #[error("failed to deliver {signal} to task {task_id}")]
    SignalFailed {
        /// The task id Nomad sent.
        task_id: String,
        /// The signal as Nomad sent it.
        signal: String,
        /// What failed.
        #[source]
        source: Box<VmError>,
    },

    /// Starting a task failed.
    #[error("failed to start task {task_id}")]
    StartFailed {
        /// The task id Nomad sent.
        task_id: String,
        /// Whether a later attempt may succeed, so that the restart policy applies.
        recoverable: bool,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl DriverError {
    fn code(&self) -> Code {
        match self {
            Self::InvalidPluginConfig(_)
            | Self::PluginConfigRejected(_)
            | Self::MissingField { .. }
            | Self::InvalidHandle { .. }
            | Self::UnsupportedSignal { .. } => Code::InvalidArgument,
            Self::TaskStarting { .. } => Code::AlreadyExists,
            Self::BuiltinHandle { .. } | Self::UnsupportedHandleVersion { .. } => {
                Code::FailedPrecondition
            }
            Self::RecoverFailed { .. } | Self::StopFailed { .. } | Self::SignalFailed { .. } => {
                Code::Internal
            }
            Self::TaskNotFound { .. } => Code::NotFound,
            Self::ExecUnsupported | Self::NetworkUnsupported => Code::Unimplemented,
            // Go plugins use FailedPrecondition for start failures; Nomad only reads the detail.
            Self::StartFailed { .. } => Code::FailedPrecondition,
        }
    }

    fn recoverable(&self) -> Option<bool> {
        match self {
            Self::StartFailed { recoverable, .. } => Some(*recoverable),
            _ => None,
        }
    }
}

/// Converts `error` into the status an RPC returns.
///
/// The message is the error followed by its sources, because Nomad shows only this text to
/// the user (as `rpc error: code = … desc = <message>`). A start failure carries a
/// `RecoverableError` detail that tells whether the restart policy applies.
pub fn to_status(error: &DriverError) -> Status {
    let code = error.code();
    let message = error_chain(error);

    let Some(recoverable) = error.recoverable() else {
        return Status::new(code, message);
    };

    let detail = RecoverableError { recoverable };
    let details = rpc::Status {
        code: code as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: RECOVERABLE_ERROR_TYPE_URL.to_owned(),
            value: detail.encode_to_vec(),
        }],
    };
    Status::with_details(code, message, details.encode_to_vec().into())
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    fn decode_details(status: &Status) -> rpc::Status {
        rpc::Status::decode(status.details()).expect("details decode as google.rpc.Status")
    }

    fn start_failure(recoverable: bool) -> DriverError {
        DriverError::StartFailed {
            task_id: "alloc/web/0a1b2c3d".into(),
            recoverable,
            source: Box::new(io::Error::new(io::ErrorKind::TimedOut, "no QMP greeting")),
        }
    }

    #[test]
    fn start_failure_recoverable_detail() {
        let status = to_status(&start_failure(true));

        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "failed to start task alloc/web/0a1b2c3d: no QMP greeting"
        );
        let details = decode_details(&status);
        assert_eq!(details.code, Code::FailedPrecondition as i32);
        assert_eq!(details.message, status.message());
        assert_eq!(details.details.len(), 1);
        assert_eq!(details.details[0].type_url, RECOVERABLE_ERROR_TYPE_URL);
        let detail = RecoverableError::decode(details.details[0].value.as_slice())
            .expect("detail decodes as RecoverableError");
        assert!(detail.recoverable);
    }

    #[test]
    fn start_failure_fatal_detail() {
        let status = to_status(&start_failure(false));

        let details = decode_details(&status);
        let detail = RecoverableError::decode(details.details[0].value.as_slice())
            .expect("detail decodes as RecoverableError");
        assert!(!detail.recoverable);
    }

    #[test]
    fn other_errors_have_no_details() {
        let cases = [
            (
                DriverError::TaskNotFound {
                    task_id: "a/b/c".into(),
                },
                Code::NotFound,
            ),
            (
                DriverError::MissingField { field: "task.id" },
                Code::InvalidArgument,
            ),
            (DriverError::ExecUnsupported, Code::Unimplemented),
            (DriverError::NetworkUnsupported, Code::Unimplemented),
        ];
        for (error, code) in cases {
            let status = to_status(&error);
            assert_eq!(status.code(), code, "code of {error}");
            assert_eq!(status.message(), error.to_string());
            assert!(status.details().is_empty(), "details of {error}");
        }
    }
}
