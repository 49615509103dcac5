//! SignalTask: the signals a VM understands.
//!
//! A VM has no process to signal that the guest would see, so each supported signal maps to a
//! QMP action:
//!
//! | Signal | Action |
//! |---|---|
//! | SIGSTOP | pause the vCPUs (QMP `stop`) |
//! | SIGCONT | resume the vCPUs (QMP `cont`) |
//! | SIGINT, SIGTERM, SIGPWR | press the ACPI power button once (QMP `system_powerdown`), without the stop ladder; the guest decides whether to power off |
//!
//! SIGKILL and every other signal are rejected with an error that lists these. Forcing a VM
//! off is what stopping the task does, after its `kill_timeout`.

use tracing::Instrument;

use crate::driver::nomad::error::DriverError;
use crate::driver::nomad::proto::drivers::SignalTaskRequest;

use super::DriverService;

/// What a supported signal does to the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    /// Pause the vCPUs.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Press the ACPI power button once.
    PowerButton,
}

impl SignalAction {
    /// Maps a signal name as Nomad sends it (`SIGSTOP`; `STOP` and lower case are accepted).
    pub fn parse(signal: &str) -> Result<Self, DriverError> {
        let upper = signal.trim().to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        match name {
            "STOP" => Ok(SignalAction::Pause),
            "CONT" => Ok(SignalAction::Resume),
            "INT" | "TERM" | "PWR" => Ok(SignalAction::PowerButton),
            _ => Err(DriverError::UnsupportedSignal {
                signal: signal.to_owned(),
            }),
        }
    }
}

impl DriverService {
    /// Delivers a signal to the task's VM as the QMP action of [`SignalAction`].
    pub(super) async fn signal_task(&self, request: SignalTaskRequest) -> Result<(), DriverError> {
        let span = self.task_span("signal_task", &request.task_id);
        async {
            let task = self.task(&request.task_id)?;
            let action = SignalAction::parse(&request.signal)?;
            let failed = |source| DriverError::SignalFailed {
                task_id: request.task_id.clone(),
                signal: request.signal.clone(),
                source: Box::new(source),
            };
            let Some(vm) = task.vm() else {
                return Err(failed(crate::driver::vm::VmError::InvalidState {
                    vm: task.state().vm.name.clone(),
                    operation: "signal",
                    state: crate::driver::vm::VmState::Exited,
                }));
            };
            let result = match action {
                SignalAction::Pause => vm.pause().await,
                SignalAction::Resume => vm.resume().await,
                SignalAction::PowerButton => vm.press_power_button().await,
            };
            result.map_err(failed)?;
            tracing::info!(signal = %request.signal, ?action, "signal delivered");
            Ok(())
        }
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_supported_names() {
        let cases = [
            ("SIGSTOP", SignalAction::Pause),
            ("stop", SignalAction::Pause),
            ("SIGCONT", SignalAction::Resume),
            ("SIGINT", SignalAction::PowerButton),
            ("SIGTERM", SignalAction::PowerButton),
            ("SIGPWR", SignalAction::PowerButton),
        ];
        for (name, expected) in cases {
            assert_eq!(SignalAction::parse(name).expect(name), expected, "{name}");
        }
    }

    #[test]
    fn signal_rejects_others() {
        for name in ["SIGKILL", "SIGHUP", "SIGUSR1", "", "9"] {
            let error = SignalAction::parse(name).unwrap_err();
            let message = error.to_string();
            assert!(message.contains(&format!("{name:?}")), "{message}");
            assert!(message.contains("SIGSTOP"), "{message}");
        }
    }
}
