//! Why a VM ended, built from QMP events and the process's own status.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::sys::{self, WaitStatus};

/// How the QEMU process ended, as `wait` reports it.
///
/// The exit code and the signal are only known when this process is QEMU's parent, or on Linux
/// 6.15 and later where a pidfd reports the status after another parent reaped QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProcessStatus {
    /// QEMU exited with this code.
    Exited(i32),
    /// QEMU was killed by this signal.
    Signaled(i32),
    /// QEMU is gone, but its status could not be read.
    Unknown,
}

impl From<Option<WaitStatus>> for ProcessStatus {
    fn from(status: Option<WaitStatus>) -> Self {
        match status {
            Some(WaitStatus::Exited(code)) => ProcessStatus::Exited(code),
            Some(WaitStatus::Signaled(signal)) => ProcessStatus::Signaled(signal),
            None => ProcessStatus::Unknown,
        }
    }
}

impl ProcessStatus {
    /// The exit code, if QEMU exited and the code is known.
    pub fn code(self) -> Option<i32> {
        match self {
            ProcessStatus::Exited(code) => Some(code),
            _ => None,
        }
    }

    /// The terminating signal, if QEMU was killed by one and it is known.
    pub fn signal(self) -> Option<i32> {
        match self {
            ProcessStatus::Signaled(signal) => Some(signal),
            _ => None,
        }
    }
}

impl fmt::Display for ProcessStatus {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessStatus::Exited(code) => write!(formatter, "exit code {code}"),
            ProcessStatus::Signaled(signal) => {
                write!(formatter, "signal {signal} ({})", sys::signal_name(*signal))
            }
            ProcessStatus::Unknown => formatter.write_str("exit status unknown"),
        }
    }
}

/// The step of a stop that ended a VM whose guest did not power off in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ForceStep {
    /// QMP `quit`.
    Quit,
    /// A signal to QEMU's process group.
    Signal(i32),
}

impl fmt::Display for ForceStep {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForceStep::Quit => formatter.write_str("QMP quit"),
            ForceStep::Signal(signal) => formatter.write_str(&sys::signal_name(*signal)),
        }
    }
}

/// Why the VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// The guest powered itself off (QMP `SHUTDOWN`, reason `guest-shutdown`).
    GuestPoweredOff,
    /// The guest reported a panic (`GUEST_PANICKED`, or `SHUTDOWN` reason `guest-panic`).
    GuestPanicked,
    /// The guest reset itself and QEMU runs with `-no-reboot` (`SHUTDOWN` reason `guest-reset`,
    /// which is also how a Linux guest with `panic=-1` ends after a kernel panic).
    GuestReset,
    /// A stop forced the VM off after the guest did not power off in time.
    Forced(ForceStep),
    /// Someone else sent QMP `quit` (`SHUTDOWN` reason `host-qmp-quit`).
    QuitByHost,
    /// QEMU caught a termination signal and shut down (`SHUTDOWN` reason `host-signal`).
    HostSignal,
    /// QEMU was killed by a signal it cannot catch, with no `SHUTDOWN` event.
    Killed(i32),
    /// QEMU ended without a `SHUTDOWN` event and without a known signal: a crash, or an
    /// outside SIGKILL whose status could not be read.
    Crashed,
}

impl fmt::Display for ExitReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::GuestPoweredOff => formatter.write_str("guest powered off"),
            ExitReason::GuestPanicked => formatter.write_str("guest panicked"),
            ExitReason::GuestReset => formatter.write_str("guest reset with -no-reboot"),
            ExitReason::Forced(step) => {
                write!(formatter, "forced off by {step} after the stop timeout")
            }
            ExitReason::QuitByHost => formatter.write_str("quit by the host over QMP"),
            ExitReason::HostSignal => formatter.write_str("shut down by a host signal"),
            ExitReason::Killed(signal) => write!(
                formatter,
                "killed by signal {signal} ({})",
                sys::signal_name(*signal)
            ),
            ExitReason::Crashed => formatter.write_str("QEMU crashed or was killed"),
        }
    }
}

/// The final result of a VM, the same for every caller of `Vm::wait`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmExit {
    /// Why the VM ended.
    pub reason: ExitReason,
    /// How the QEMU process ended.
    pub status: ProcessStatus,
}

impl fmt::Display for VmExit {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{} ({})", self.reason, self.status)
    }
}

/// What the VM layer saw before QEMU ended, gathered from QMP events and stop steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ExitEvidence {
    /// `GUEST_PANICKED` was seen.
    pub panicked: bool,
    /// The `SHUTDOWN` event's `guest` and `reason`, if one came.
    pub shutdown: Option<(bool, ShutdownKind)>,
    /// The force step a stop took, if it had to.
    pub forced: Option<ForceStep>,
}

/// The `SHUTDOWN` reasons the exit logic tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShutdownKind {
    GuestShutdown,
    GuestReset,
    GuestPanic,
    HostQmpQuit,
    HostSignal,
    Other,
}

impl ExitEvidence {
    /// Decides why the VM ended. Guest-side causes win over host-side ones, because a guest
    /// that powered off just before a forced step still powered off by itself.
    pub fn reason(&self, status: ProcessStatus) -> ExitReason {
        if self.panicked {
            return ExitReason::GuestPanicked;
        }
        match self.shutdown {
            Some((_, ShutdownKind::GuestShutdown)) => return ExitReason::GuestPoweredOff,
            Some((_, ShutdownKind::GuestPanic)) => return ExitReason::GuestPanicked,
            Some((_, ShutdownKind::GuestReset)) => return ExitReason::GuestReset,
            _ => {}
        }
        if let Some(step) = self.forced {
            return ExitReason::Forced(step);
        }
        match (self.shutdown, status) {
            (Some((_, ShutdownKind::HostQmpQuit)), _) => ExitReason::QuitByHost,
            (Some((_, ShutdownKind::HostSignal)), _) => ExitReason::HostSignal,
            (_, ProcessStatus::Signaled(signal)) => ExitReason::Killed(signal),
            (Some((true, _)), _) => ExitReason::GuestPoweredOff,
            (Some((false, _)), ProcessStatus::Exited(0)) => ExitReason::QuitByHost,
            _ => ExitReason::Crashed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn evidence(shutdown: Option<(bool, ShutdownKind)>) -> ExitEvidence {
        ExitEvidence {
            shutdown,
            ..ExitEvidence::default()
        }
    }

    #[test]
    fn reason_guest_poweroff() {
        let reason =
            evidence(Some((true, ShutdownKind::GuestShutdown))).reason(ProcessStatus::Exited(0));
        assert_eq!(reason, ExitReason::GuestPoweredOff);
    }

    #[test]
    fn reason_guest_wins_over_force() {
        let mut seen = evidence(Some((true, ShutdownKind::GuestShutdown)));
        seen.forced = Some(ForceStep::Quit);
        assert_eq!(
            seen.reason(ProcessStatus::Exited(0)),
            ExitReason::GuestPoweredOff
        );
    }

    #[test]
    fn reason_forced_quit() {
        let mut seen = evidence(Some((false, ShutdownKind::HostQmpQuit)));
        seen.forced = Some(ForceStep::Quit);
        assert_eq!(
            seen.reason(ProcessStatus::Exited(0)),
            ExitReason::Forced(ForceStep::Quit)
        );
    }

    #[test]
    fn reason_sigkill_without_event() {
        let reason = evidence(None).reason(ProcessStatus::Signaled(9));
        assert_eq!(reason, ExitReason::Killed(9));
        assert_eq!(reason.to_string(), "killed by signal 9 (SIGKILL)");
    }

    #[test]
    fn reason_unknown_status_is_crash() {
        assert_eq!(
            evidence(None).reason(ProcessStatus::Unknown),
            ExitReason::Crashed
        );
        assert_eq!(
            evidence(None).reason(ProcessStatus::Exited(1)),
            ExitReason::Crashed
        );
    }

    #[test]
    fn reason_panic_event() {
        let mut seen = evidence(Some((true, ShutdownKind::GuestReset)));
        seen.panicked = true;
        assert_eq!(
            seen.reason(ProcessStatus::Exited(0)),
            ExitReason::GuestPanicked
        );
    }

    #[test]
    fn status_keeps_code_and_signal_apart() {
        assert_eq!(ProcessStatus::Exited(9).signal(), None);
        assert_eq!(ProcessStatus::Exited(9).code(), Some(9));
        assert_eq!(ProcessStatus::Signaled(9).code(), None);
        assert_eq!(ProcessStatus::Unknown.to_string(), "exit status unknown");
    }
}
