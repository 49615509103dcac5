//! RecoverTask: adopting a task's VM after a plugin or agent restart. It never boots a guest.

use std::sync::Arc;

use tracing::Instrument;

use crate::driver::nomad::error::DriverError;
use crate::driver::nomad::handle::{
    builtin_qemu_pid, DriverState, BUILTIN_HANDLE_VERSION, HANDLE_VERSION,
};
use crate::driver::nomad::proto::drivers::{RecoverTaskRequest, TaskConfig, TaskHandle};
use crate::driver::vm::{sys, Vm, VmError, DEFAULT_REATTACH_TIMEOUT};

use super::events::EventTarget;
use super::task::Task;
use super::DriverService;

impl DriverService {
    /// Re-attaches to a task started by an earlier plugin process.
    pub(super) async fn recover_task(
        &self,
        request: RecoverTaskRequest,
    ) -> Result<(), DriverError> {
        let handle = request
            .handle
            .ok_or(DriverError::MissingField { field: "handle" })?;
        let config = handle.config.clone().unwrap_or_default();
        // Nomad never fills the request's task_id; the handle's config carries the id.
        if config.id.is_empty() {
            return Err(DriverError::MissingField {
                field: "handle.config.id",
            });
        }
        let span = tracing::info_span!(
            "recover_task",
            task_id = %config.id,
            alloc_id = %config.alloc_id,
            task = %config.name,
            vm = tracing::field::Empty,
        );
        self.recover_in_span(handle, config).instrument(span).await
    }

    async fn recover_in_span(
        &self,
        handle: TaskHandle,
        config: TaskConfig,
    ) -> Result<(), DriverError> {
        if self.tasks.get(&config.id).is_some() {
            tracing::debug!("task already known, nothing to recover");
            return Ok(());
        }
        match handle.version {
            HANDLE_VERSION => {}
            BUILTIN_HANDLE_VERSION => {
                return Err(DriverError::BuiltinHandle {
                    outcome: stop_builtin_qemu(&handle.driver_state),
                    task_id: config.id,
                })
            }
            version => {
                return Err(DriverError::UnsupportedHandleVersion {
                    task_id: config.id,
                    version,
                    expected: HANDLE_VERSION,
                })
            }
        }
        let state = DriverState::decode(&handle.driver_state).map_err(|source| {
            DriverError::InvalidHandle {
                task_id: config.id.clone(),
                source,
            }
        })?;
        tracing::Span::current().record("vm", state.vm.name.as_str());

        let task = match Vm::reattach(&state.vm, DEFAULT_REATTACH_TIMEOUT).await {
            Ok(vm) => {
                let forwarder = self.events.forward(EventTarget::of(&config), vm.events());
                tracing::info!(pid = vm.pid(), state = %vm.state(), "VM recovered");
                Task::running(config.clone(), state, vm, forwarder)
            }
            Err(VmError::ProcessMismatch { detail, .. }) => {
                tracing::info!(pid = state.vm.pid, %detail, "VM exited while no plugin process watched it");
                Task::exited_unobserved(config.clone(), state)
            }
            Err(source) => {
                return Err(DriverError::RecoverFailed {
                    outcome: kill_unadoptable(&state),
                    task_id: config.id,
                    source: Box::new(source),
                })
            }
        };
        if self.tasks.insert(&config.id, Arc::new(task)).is_err() {
            tracing::debug!("task recovered by a concurrent call");
        }
        Ok(())
    }
}

/// Kills a VM that is alive but could not be adopted, because Nomad answers a failed recovery
/// by starting the task again and two VMs on one disk image would corrupt it. Returns what
/// happened, for the error message.
fn kill_unadoptable(state: &DriverState) -> String {
    let pid = state.vm.pid;
    match sys::process_start_time(pid) {
        Ok(start_time) if start_time == state.vm.start_time => {}
        _ => return format!("its QEMU (pid {pid}) is gone"),
    }
    match sys::signal_process_group(pid, libc::SIGKILL) {
        Ok(()) => {
            tracing::warn!(pid, "killed a VM that could not be adopted");
            format!("its QEMU (pid {pid}) was killed so that Nomad can start the task again")
        }
        Err(error) => {
            tracing::error!(pid, %error, "failed to kill a VM that could not be adopted");
            format!("killing its QEMU (pid {pid}) failed ({error}); kill it by hand")
        }
    }
}

/// Kills the QEMU of a built-in qemu driver task, after checking that the pid still runs a
/// `qemu-system-*` binary. Returns what happened, for the error message.
// NOTE: the built-in driver's executor process, QEMU's parent, is left to notice the exit.
fn stop_builtin_qemu(driver_state: &[u8]) -> String {
    let Some(pid) = builtin_qemu_pid(driver_state) else {
        return "its QEMU pid could not be read from the handle, so a running VM must be \
                stopped by hand"
            .to_owned();
    };
    let is_qemu = std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .and_then(|cmdline| {
            let program = cmdline.split(|byte| *byte == 0).next()?.to_vec();
            let program = String::from_utf8(program).ok()?;
            let name = std::path::Path::new(&program)
                .file_name()?
                .to_str()?
                .to_owned();
            Some(name.starts_with("qemu-system-"))
        })
        .unwrap_or(false);
    if !is_qemu {
        return format!("its QEMU (pid {pid}) is no longer running");
    }
    let Some(target) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return format!("its QEMU pid {pid} is invalid");
    };
    match rustix::process::kill_process(target, rustix::process::Signal::KILL) {
        Ok(()) => {
            tracing::warn!(pid, "killed the QEMU of a built-in qemu driver task");
            format!("its QEMU (pid {pid}) was killed")
        }
        Err(error) => {
            tracing::error!(pid, %error, "failed to kill the QEMU of a built-in qemu driver task");
            format!("killing its QEMU (pid {pid}) failed ({error}); kill it by hand")
        }
    }
}
