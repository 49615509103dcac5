//! Task lifecycle RPCs after the start: WaitTask, StopTask and DestroyTask.

use std::time::Duration;

use tracing::Instrument;

use crate::driver::nomad::cgroup;
use crate::driver::nomad::error::DriverError;
use crate::driver::nomad::proto::drivers::{
    DestroyTaskRequest, StopTaskRequest, WaitTaskRequest, WaitTaskResponse,
};
use crate::driver::vm::{sys, OPERATOR_SOCKET_NAME};

use super::DriverService;

/// Stop timeout when Nomad sends none, the default `kill_timeout` of Nomad's tasks.
const DEFAULT_KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Signal of the stop ladder's signal step when Nomad's `kill_signal` is empty.
const DEFAULT_KILL_SIGNAL: i32 = libc::SIGTERM;

impl DriverService {
    /// Waits for the task's VM to exit. Every call returns the same result until DestroyTask.
    pub(super) async fn wait_task(
        &self,
        request: WaitTaskRequest,
    ) -> Result<WaitTaskResponse, DriverError> {
        let span = self.task_span("wait_task", &request.task_id);
        async {
            let task = self.task(&request.task_id)?;
            let exit = task.wait().await;
            tracing::debug!(?exit, "task exited");
            Ok(exit.to_response())
        }
        .instrument(span)
        .await
    }

    /// Stops the task's VM and returns once it is gone.
    ///
    /// With `graceful_shutdown` the guest gets the ACPI power button and `timeout` to power
    /// off before the VM layer escalates to QMP `quit`, Nomad's `kill_signal` and SIGKILL.
    /// Without it, or with `kill_signal = "SIGKILL"`, QEMU quits at once, the way the built-in
    /// driver kills it. An unknown or exited id is already stopped: an error would make Nomad
    /// retry for about six minutes.
    pub(super) async fn stop_task(&self, request: StopTaskRequest) -> Result<(), DriverError> {
        let span = self.task_span("stop_task", &request.task_id);
        async {
            let Some(task) = self.tasks.get(&request.task_id) else {
                tracing::debug!("StopTask for an unknown task, nothing to stop");
                return Ok(());
            };
            let Some(vm) = task.vm().filter(|vm| vm.try_exit().is_none()) else {
                tracing::debug!("StopTask for an exited task, nothing to stop");
                return Ok(());
            };

            let timeout = request
                .timeout
                .and_then(|timeout| Duration::try_from(timeout).ok())
                .unwrap_or(DEFAULT_KILL_TIMEOUT);
            let signal = kill_signal(&request.signal);
            let graceful = task.state().graceful_shutdown && signal != libc::SIGKILL;
            tracing::info!(
                graceful,
                ?timeout,
                signal = %sys::signal_name(signal),
                "stopping VM"
            );

            task.mark_stop_requested();
            let result = if graceful {
                vm.stop(timeout, signal).await
            } else {
                vm.kill().await
            };
            let exit = result.map_err(|source| DriverError::StopFailed {
                task_id: request.task_id.clone(),
                source: Box::new(source),
            })?;
            tracing::info!(%exit, "VM stopped");
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Kills the VM if it still runs, removes its QMP socket and cgroups, and forgets the task. An unknown
    /// id is already destroyed.
    pub(super) async fn destroy_task(
        &self,
        request: DestroyTaskRequest,
    ) -> Result<(), DriverError> {
        let span = self.task_span("destroy_task", &request.task_id);
        async {
            let Some(task) = self.tasks.get(&request.task_id) else {
                tracing::debug!("DestroyTask for an unknown task, nothing to free");
                return Ok(());
            };
            if let Some(vm) = task.vm().filter(|vm| vm.try_exit().is_none()) {
                tracing::info!(pid = vm.pid(), "VM still running at DestroyTask, killing it");
                task.mark_stop_requested();
                vm.kill()
                    .await
                    .map_err(|source| DriverError::StopFailed {
                        task_id: request.task_id.clone(),
                        source: Box::new(source),
                    })?;
            }

            let driver_socket = task.state().qmp_socket.clone();
            let operator_socket = driver_socket.with_file_name(OPERATOR_SOCKET_NAME);
            for socket in [driver_socket, operator_socket] {
                match std::fs::remove_file(&socket) {
                    Ok(()) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => {
                        tracing::warn!(socket = %socket.display(), %error, "failed to remove a QMP socket");
                    }
                }
            }
            cgroup::cleanup(&task.state().cgroups).await;
            self.tasks.remove(&request.task_id);
            tracing::info!("task destroyed");
            Ok(())
        }
        .instrument(span)
        .await
    }
}

/// Parses Nomad's `kill_signal`. An empty value takes the default, and an unknown name falls
/// back to it with a warning, because a StopTask error would only make Nomad retry.
fn kill_signal(name: &str) -> i32 {
    if name.is_empty() {
        return DEFAULT_KILL_SIGNAL;
    }
    sys::parse_signal(name).unwrap_or_else(|| {
        tracing::warn!(kill_signal = name, "unknown kill_signal, using SIGTERM");
        DEFAULT_KILL_SIGNAL
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_signal_defaults() {
        assert_eq!(kill_signal(""), libc::SIGTERM);
        assert_eq!(kill_signal("SIGINT"), libc::SIGINT);
        assert_eq!(kill_signal("SIGKILL"), libc::SIGKILL);
        assert_eq!(kill_signal("SIGNOPE"), libc::SIGTERM);
    }
}
