//! One task of the plugin: its Nomad config, its saved state and its VM, and how the VM's
//! end becomes Nomad's exit result.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::task::AbortHandle;

use crate::driver::nomad::handle::{DriverState, HANDLE_VERSION};
use crate::driver::nomad::proto::drivers::{
    ExitResult, TaskConfig, TaskHandle, TaskState, WaitTaskResponse,
};
use crate::driver::vm::{ExitReason, ProcessStatus, Vm, VmExit};

/// Per-task state of the plugin.
#[derive(Debug)]
pub struct Task {
    config: TaskConfig,
    state: DriverState,
    /// `None` when the VM had already exited when this plugin process recovered the task.
    vm: Option<Vm>,
    /// Set when Nomad asked for the stop (StopTask or DestroyTask), so that the exit is not
    /// reported as a failure.
    stop_requested: AtomicBool,
    /// The task that forwards the VM's events as task events.
    event_forwarder: Option<AbortHandle>,
}

/// How a task ended, as WaitTask reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskExit {
    /// This process saw the VM end.
    Observed {
        /// Why and how it ended.
        exit: VmExit,
        /// Whether Nomad requested the stop.
        requested: bool,
    },
    /// The VM ended while no plugin process watched it.
    Unobserved,
}

impl Task {
    /// Creates a task around a running VM.
    pub fn running(
        config: TaskConfig,
        state: DriverState,
        vm: Vm,
        event_forwarder: AbortHandle,
    ) -> Self {
        Self {
            config,
            state,
            vm: Some(vm),
            stop_requested: AtomicBool::new(false),
            event_forwarder: Some(event_forwarder),
        }
    }

    /// Creates a recovered task whose VM ended while no plugin process watched it.
    pub fn exited_unobserved(config: TaskConfig, state: DriverState) -> Self {
        Self {
            config,
            state,
            vm: None,
            stop_requested: AtomicBool::new(false),
            event_forwarder: None,
        }
    }

    /// Returns the TaskConfig Nomad started the task with.
    pub fn config(&self) -> &TaskConfig {
        &self.config
    }

    /// Returns the state stored in the task handle.
    pub fn state(&self) -> &DriverState {
        &self.state
    }

    /// Returns the task's VM, or `None` when it ended before this process recovered the task.
    pub fn vm(&self) -> Option<Vm> {
        self.vm.clone()
    }

    /// Returns the handle StartTask returns for this task.
    pub fn handle(&self) -> TaskHandle {
        TaskHandle {
            version: HANDLE_VERSION,
            config: Some(self.config.clone()),
            state: TaskState::Running.into(),
            driver_state: self.state.encode(),
        }
    }

    /// Records that Nomad requested the VM's stop.
    pub fn mark_stop_requested(&self) {
        self.stop_requested.store(true, Ordering::SeqCst);
    }

    /// Returns how the task ended, or `None` while it runs.
    pub fn try_exit(&self) -> Option<TaskExit> {
        match &self.vm {
            Some(vm) => vm.try_exit().map(|exit| self.observed(exit)),
            None => Some(TaskExit::Unobserved),
        }
    }

    /// Waits until the task ends.
    pub async fn wait(&self) -> TaskExit {
        match &self.vm {
            Some(vm) => {
                let exit = vm.wait().await;
                self.observed(exit)
            }
            None => TaskExit::Unobserved,
        }
    }

    fn observed(&self, exit: VmExit) -> TaskExit {
        TaskExit::Observed {
            exit,
            requested: self.stop_requested.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(forwarder) = &self.event_forwarder {
            forwarder.abort();
        }
    }
}

impl TaskExit {
    /// Maps the exit to WaitTask's result.
    ///
    /// A guest that powered itself off is a success. So is any end of a stop Nomad requested,
    /// because Nomad already shows that it killed the task, unless the guest panicked or QEMU
    /// crashed on the way. Everything else fails with `err` naming the reason. A signal that
    /// killed QEMU is in `signal`, with exit code 128 + the signal number.
    pub fn to_response(self) -> WaitTaskResponse {
        let TaskExit::Observed { exit, requested } = self else {
            return WaitTaskResponse {
                result: Some(ExitResult::default()),
                err: "the VM exited while no plugin process was watching it (after a plugin \
                      or agent restart); its exit reason and status are unknown"
                    .to_owned(),
            };
        };

        let (exit_code, signal) = match (exit.reason, exit.status) {
            (_, ProcessStatus::Signaled(signal)) | (ExitReason::Killed(signal), _) => {
                (128 + signal, signal)
            }
            (_, ProcessStatus::Exited(code)) => (code, 0),
            (_, ProcessStatus::Unknown) => (0, 0),
        };

        let success = match exit.reason {
            ExitReason::GuestPoweredOff => true,
            ExitReason::GuestPanicked | ExitReason::Crashed => false,
            _ => requested,
        };
        let err = if success {
            String::new()
        } else if exit.status == ProcessStatus::Unknown {
            format!(
                "VM exited: {}; the exit status is unknown because QEMU is not a child of \
                 this plugin process (it was started before a plugin restart)",
                exit.reason
            )
        } else {
            format!("VM exited: {exit}")
        };

        WaitTaskResponse {
            result: Some(ExitResult {
                exit_code,
                signal,
                oom_killed: false,
            }),
            err,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::driver::vm::ForceStep;

    use super::*;

    fn observed(reason: ExitReason, status: ProcessStatus, requested: bool) -> WaitTaskResponse {
        TaskExit::Observed {
            exit: VmExit { reason, status },
            requested,
        }
        .to_response()
    }

    fn result(response: &WaitTaskResponse) -> (i32, i32) {
        let result = response.result.expect("result is always present");
        (result.exit_code, result.signal)
    }

    #[test]
    fn exit_guest_poweroff_succeeds() {
        let response = observed(ExitReason::GuestPoweredOff, ProcessStatus::Exited(0), false);
        assert_eq!(result(&response), (0, 0));
        assert_eq!(response.err, "");
    }

    #[test]
    fn exit_guest_poweroff_unknown_status_succeeds() {
        let response = observed(ExitReason::GuestPoweredOff, ProcessStatus::Unknown, true);
        assert_eq!(result(&response), (0, 0));
        assert_eq!(response.err, "");
    }

    #[test]
    fn exit_requested_force_succeeds() {
        let quit = observed(
            ExitReason::Forced(ForceStep::Quit),
            ProcessStatus::Exited(0),
            true,
        );
        assert_eq!(result(&quit), (0, 0));
        assert_eq!(quit.err, "");

        let killed = observed(
            ExitReason::Forced(ForceStep::Signal(libc::SIGKILL)),
            ProcessStatus::Signaled(libc::SIGKILL),
            true,
        );
        assert_eq!(result(&killed), (137, 9));
        assert_eq!(killed.err, "");
    }

    #[test]
    fn exit_outside_signal_fails() {
        let response = observed(
            ExitReason::Killed(libc::SIGKILL),
            ProcessStatus::Signaled(libc::SIGKILL),
            false,
        );
        assert_eq!(result(&response), (137, 9));
        assert!(
            response.err.contains("killed by signal 9"),
            "{}",
            response.err
        );
    }

    #[test]
    fn exit_killed_unknown_status() {
        let response = observed(
            ExitReason::Killed(libc::SIGTERM),
            ProcessStatus::Unknown,
            false,
        );
        assert_eq!(result(&response), (143, 15));
        assert!(response.err.contains("unknown"), "{}", response.err);
    }

    #[test]
    fn exit_panic_fails_even_when_requested() {
        let response = observed(ExitReason::GuestPanicked, ProcessStatus::Exited(0), true);
        assert_eq!(result(&response), (0, 0));
        assert!(response.err.contains("guest panicked"), "{}", response.err);
    }

    #[test]
    fn exit_crash_keeps_code() {
        let response = observed(ExitReason::Crashed, ProcessStatus::Exited(1), false);
        assert_eq!(result(&response), (1, 0));
        assert!(response.err.contains("crashed"), "{}", response.err);
    }

    #[test]
    fn exit_host_quit_fails() {
        let response = observed(ExitReason::QuitByHost, ProcessStatus::Exited(0), false);
        assert!(
            response.err.contains("quit by the host"),
            "{}",
            response.err
        );
    }

    #[test]
    fn exit_unobserved_explains() {
        let response = TaskExit::Unobserved.to_response();
        assert_eq!(result(&response), (0, 0));
        assert!(response.err.contains("unknown"), "{}", response.err);
    }
}
