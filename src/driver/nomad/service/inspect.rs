//! Read-only and signal RPCs on a running task: InspectTask, TaskStats and SignalTask.

use crate::driver::nomad::error::DriverError;
use crate::driver::nomad::proto::drivers::{
    InspectTaskRequest, InspectTaskResponse, SignalTaskRequest, TaskState, TaskStatus,
};

use super::DriverService;

impl DriverService {
    /// Reports the task's id, name and state. Nomad's client never calls this RPC.
    pub(super) async fn inspect_task(
        &self,
        request: InspectTaskRequest,
    ) -> Result<InspectTaskResponse, DriverError> {
        let task = self
            .tasks
            .get(&request.task_id)
            .ok_or_else(|| DriverError::TaskNotFound {
                task_id: request.task_id.clone(),
            })?;
        Ok(InspectTaskResponse {
            task: Some(TaskStatus {
                id: task.config.id.clone(),
                name: task.config.name.clone(),
                state: TaskState::Running.into(),
                ..TaskStatus::default()
            }),
            ..InspectTaskResponse::default()
        })
    }

    /// Checks that the task exists before stats are streamed.
    pub(super) fn check_stats_task(&self, task_id: &str) -> Result<(), DriverError> {
        self.tasks
            .get(task_id)
            .ok_or_else(|| DriverError::TaskNotFound {
                task_id: task_id.to_owned(),
            })?;
        Err(DriverError::VmLayerMissing { rpc: "TaskStats" })
    }

    /// Delivers a signal to the task's VM.
    pub(super) async fn signal_task(&self, request: SignalTaskRequest) -> Result<(), DriverError> {
        self.tasks
            .get(&request.task_id)
            .ok_or_else(|| DriverError::TaskNotFound {
                task_id: request.task_id.clone(),
            })?;
        Err(DriverError::VmLayerMissing { rpc: "SignalTask" })
    }
}
