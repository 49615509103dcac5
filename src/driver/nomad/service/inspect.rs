//! Read-only RPCs on a task: InspectTask, and the task check of TaskStats.

use tracing::Instrument;

use crate::driver::nomad::error::DriverError;
use crate::driver::nomad::proto::drivers::{
    InspectTaskRequest, InspectTaskResponse, TaskState, TaskStatus,
};

use super::DriverService;

impl DriverService {
    /// Reports the task's id, name, state, start time and, once it exited, its result. Nomad's
    /// client never calls this RPC.
    pub(super) async fn inspect_task(
        &self,
        request: InspectTaskRequest,
    ) -> Result<InspectTaskResponse, DriverError> {
        let span = self.task_span("inspect_task", &request.task_id);
        async {
            let task = self.task(&request.task_id)?;
            let exit = task.try_exit();
            let state = if exit.is_some() {
                TaskState::Exited
            } else {
                TaskState::Running
            };
            Ok(InspectTaskResponse {
                task: Some(TaskStatus {
                    id: task.config().id.clone(),
                    name: task.config().name.clone(),
                    state: state.into(),
                    started_at: Some(task.state().started_at.into()),
                    result: exit.and_then(|exit| exit.to_response().result),
                    ..TaskStatus::default()
                }),
                ..InspectTaskResponse::default()
            })
        }
        .instrument(span)
        .await
    }
}
