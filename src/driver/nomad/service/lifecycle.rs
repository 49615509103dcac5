//! Task lifecycle RPCs: StartTask, RecoverTask, WaitTask, StopTask and DestroyTask.

use crate::driver::nomad::config::TaskConfig as DriverConfig;
use crate::driver::nomad::error::DriverError;
use crate::driver::nomad::proto::drivers::{
    DestroyTaskRequest, RecoverTaskRequest, StartTaskRequest, StartTaskResponse, StopTaskRequest,
    WaitTaskRequest, WaitTaskResponse,
};

use super::DriverService;

impl DriverService {
    /// Decodes the task's driver config, so that a bad job fails with the decoder's message,
    /// then reports that VMs cannot be started yet.
    pub(super) async fn start_task(
        &self,
        request: StartTaskRequest,
    ) -> Result<StartTaskResponse, DriverError> {
        let task = request
            .task
            .ok_or(DriverError::MissingField { field: "task" })?;
        if task.id.is_empty() {
            return Err(DriverError::MissingField { field: "task.id" });
        }
        let _span = tracing::info_span!(
            "start_task",
            task_id = %task.id,
            alloc_id = %task.alloc_id,
            task = %task.name
        )
        .entered();

        DriverConfig::decode(&task.msgpack_driver_config).map_err(|source| {
            DriverError::StartFailed {
                task_id: task.id.clone(),
                recoverable: false,
                source: Box::new(source),
            }
        })?;

        // TODO: start the VM through `crate::driver::vm` and store its handle in `self.tasks`.
        Err(DriverError::VmLayerMissing { rpc: "StartTask" })
    }

    /// Re-attaches to a task started by an earlier plugin process.
    pub(super) async fn recover_task(
        &self,
        request: RecoverTaskRequest,
    ) -> Result<(), DriverError> {
        let handle = request
            .handle
            .ok_or(DriverError::MissingField { field: "handle" })?;
        let task_id = handle.config.map(|config| config.id).unwrap_or_default();
        if task_id.is_empty() {
            return Err(DriverError::MissingField {
                field: "handle.config.id",
            });
        }
        // A reattached plugin process already tracks its tasks.
        if self.tasks.get(&task_id).is_some() {
            return Ok(());
        }
        // TODO: decode `handle.driver_state` and reattach through `crate::driver::vm`.
        Err(DriverError::VmLayerMissing { rpc: "RecoverTask" })
    }

    /// Waits for the task's VM to exit.
    pub(super) async fn wait_task(
        &self,
        request: WaitTaskRequest,
    ) -> Result<WaitTaskResponse, DriverError> {
        self.tasks
            .get(&request.task_id)
            .ok_or_else(|| DriverError::TaskNotFound {
                task_id: request.task_id.clone(),
            })?;
        Err(DriverError::VmLayerMissing { rpc: "WaitTask" })
    }

    /// Stops the task's VM. An unknown id is already stopped: an error would make Nomad retry
    /// for about six minutes.
    pub(super) async fn stop_task(&self, request: StopTaskRequest) -> Result<(), DriverError> {
        if self.tasks.get(&request.task_id).is_none() {
            tracing::debug!(task_id = %request.task_id, "StopTask for an unknown task, nothing to stop");
            return Ok(());
        }
        Err(DriverError::VmLayerMissing { rpc: "StopTask" })
    }

    /// Forgets the task and frees what it holds. An unknown id is already destroyed.
    pub(super) async fn destroy_task(
        &self,
        request: DestroyTaskRequest,
    ) -> Result<(), DriverError> {
        if self.tasks.get(&request.task_id).is_none() {
            tracing::debug!(task_id = %request.task_id, "DestroyTask for an unknown task, nothing to free");
            return Ok(());
        }
        Err(DriverError::VmLayerMissing { rpc: "DestroyTask" })
    }
}
