//! The `Driver` service: one file per group of RPCs over a shared [`TaskStore`].
//!
//! Each RPC logs its error once, here, and [`to_status`] turns it into the gRPC status.

mod events;
mod fingerprint;
mod inspect;
mod lifecycle;
mod recover;
mod signal;
mod start;
pub mod stats;
mod store;
mod task;

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub use events::{EventTarget, TaskEvents};
pub use fingerprint::{KvmCache, FINGERPRINT_PERIOD};
pub use signal::SignalAction;
pub use store::TaskStore;
pub use task::{Task, TaskExit};

use super::base::PluginState;
use super::error::{to_status, DriverError};
use super::proto::drivers::{
    driver_capabilities::{FsIsolation, MountConfigs},
    driver_server::Driver,
    network_isolation_spec::NetworkIsolationMode,
    CapabilitiesRequest, CapabilitiesResponse, CreateNetworkRequest, CreateNetworkResponse,
    DestroyNetworkRequest, DestroyNetworkResponse, DestroyTaskRequest, DestroyTaskResponse,
    DriverCapabilities, ExecTaskRequest, ExecTaskResponse, ExecTaskStreamingRequest,
    ExecTaskStreamingResponse, FingerprintRequest, InitRequest, InitResponse, InspectTaskRequest,
    InspectTaskResponse, RecoverTaskRequest, RecoverTaskResponse, ShutdownRequest,
    ShutdownResponse, SignalTaskRequest, SignalTaskResponse, StartTaskRequest, StartTaskResponse,
    StopTaskRequest, StopTaskResponse, TaskConfigSchemaRequest, TaskConfigSchemaResponse,
    TaskEventsRequest, TaskStatsRequest, WaitTaskRequest, WaitTaskResponse,
};
use super::schema;
use crate::fingerprint::Probes;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Returns the capabilities Nomad's client plans tasks with.
///
/// They match the built-in qemu driver (Nomad v1.6.5 `drivers/qemu/driver.go`) with two
/// exceptions. `send_signals` is true, because SIGSTOP and SIGCONT pause and resume the VM.
/// `fs_isolation` is NONE, as in the built-in driver of later releases, so that
/// `NOMAD_TASK_DIR` and the other task paths are host paths QEMU can open. v1.6.5 reported
/// IMAGE.
pub fn capabilities() -> DriverCapabilities {
    DriverCapabilities {
        send_signals: true,
        exec: false,
        fs_isolation: FsIsolation::None.into(),
        network_isolation_modes: vec![
            NetworkIsolationMode::Host.into(),
            NetworkIsolationMode::Group.into(),
        ],
        must_create_network: false,
        mount_configs: MountConfigs::NoMounts.into(),
        disable_log_collection: false,
        dynamic_workload_users: false,
    }
}

/// The `Driver` service of one plugin process.
pub struct DriverService {
    state: Arc<PluginState>,
    tasks: TaskStore<Task>,
    starting: Arc<start::StartingTasks>,
    events: TaskEvents,
    kvm: KvmCache,
    shutdown: CancellationToken,
}

impl DriverService {
    /// Creates the service. Its streams end when `shutdown` is cancelled.
    pub fn new(state: Arc<PluginState>, events: TaskEvents, shutdown: CancellationToken) -> Self {
        Self {
            state,
            tasks: TaskStore::default(),
            starting: Arc::default(),
            events,
            kvm: KvmCache::default(),
            shutdown,
        }
    }

    /// Returns the task `task_id`, or the error for an unknown id.
    fn task(&self, task_id: &str) -> Result<Arc<Task>, DriverError> {
        self.tasks
            .get(task_id)
            .ok_or_else(|| DriverError::TaskNotFound {
                task_id: task_id.to_owned(),
            })
    }

    /// Returns the span of `rpc` on `task_id`, with the alloc id, task name and VM name when
    /// the task is known.
    fn task_span(&self, rpc: &'static str, task_id: &str) -> tracing::Span {
        let task = self.tasks.get(task_id);
        tracing::info_span!(
            "task_rpc",
            rpc,
            task_id,
            alloc_id = task
                .as_ref()
                .map_or("", |task| task.config().alloc_id.as_str()),
            task = task.as_ref().map_or("", |task| task.config().name.as_str()),
            vm = task
                .as_ref()
                .map_or("", |task| task.state().vm.name.as_str()),
        )
    }
}

/// Logs `error` for `rpc` and converts it to the status the RPC returns.
fn reject(rpc: &'static str, error: DriverError) -> Status {
    match &error {
        DriverError::TaskNotFound { .. } => tracing::warn!(rpc, error = %error, "request rejected"),
        _ => tracing::error!(rpc, error = %error, "request failed"),
    }
    to_status(&error)
}

#[tonic::async_trait]
impl Driver for DriverService {
    type FingerprintStream = fingerprint::FingerprintStream;
    type TaskStatsStream = stats::TaskStatsStream;
    type TaskEventsStream = events::TaskEventStream;
    type ExecTaskStreamingStream = ResponseStream<ExecTaskStreamingResponse>;

    async fn init(&self, _request: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        tracing::info!(plugin_name = %self.state.name(), "driver initialised");
        Ok(Response::new(InitResponse {}))
    }

    async fn task_config_schema(
        &self,
        _request: Request<TaskConfigSchemaRequest>,
    ) -> Result<Response<TaskConfigSchemaResponse>, Status> {
        Ok(Response::new(TaskConfigSchemaResponse {
            spec: Some(schema::task_config_spec()),
        }))
    }

    async fn capabilities(
        &self,
        _request: Request<CapabilitiesRequest>,
    ) -> Result<Response<CapabilitiesResponse>, Status> {
        Ok(Response::new(CapabilitiesResponse {
            capabilities: Some(capabilities()),
        }))
    }

    async fn fingerprint(
        &self,
        _request: Request<FingerprintRequest>,
    ) -> Result<Response<Self::FingerprintStream>, Status> {
        let probes = Probes::host(self.state.settings().plugin.emulators_allowlist.clone());
        let stream = fingerprint::open(
            self.state.name(),
            probes,
            self.kvm.clone(),
            self.shutdown.clone(),
        );
        Ok(Response::new(stream))
    }

    async fn recover_task(
        &self,
        request: Request<RecoverTaskRequest>,
    ) -> Result<Response<RecoverTaskResponse>, Status> {
        self.recover_task(request.into_inner())
            .await
            .map_err(|error| reject("RecoverTask", error))?;
        Ok(Response::new(RecoverTaskResponse {}))
    }

    async fn start_task(
        &self,
        request: Request<StartTaskRequest>,
    ) -> Result<Response<StartTaskResponse>, Status> {
        let response = self
            .start_task(request.into_inner())
            .await
            .map_err(|error| reject("StartTask", error))?;
        Ok(Response::new(response))
    }

    async fn wait_task(
        &self,
        request: Request<WaitTaskRequest>,
    ) -> Result<Response<WaitTaskResponse>, Status> {
        let response = self
            .wait_task(request.into_inner())
            .await
            .map_err(|error| reject("WaitTask", error))?;
        Ok(Response::new(response))
    }

    async fn stop_task(
        &self,
        request: Request<StopTaskRequest>,
    ) -> Result<Response<StopTaskResponse>, Status> {
        self.stop_task(request.into_inner())
            .await
            .map_err(|error| reject("StopTask", error))?;
        Ok(Response::new(StopTaskResponse {}))
    }

    async fn destroy_task(
        &self,
        request: Request<DestroyTaskRequest>,
    ) -> Result<Response<DestroyTaskResponse>, Status> {
        self.destroy_task(request.into_inner())
            .await
            .map_err(|error| reject("DestroyTask", error))?;
        Ok(Response::new(DestroyTaskResponse {}))
    }

    async fn inspect_task(
        &self,
        request: Request<InspectTaskRequest>,
    ) -> Result<Response<InspectTaskResponse>, Status> {
        let response = self
            .inspect_task(request.into_inner())
            .await
            .map_err(|error| reject("InspectTask", error))?;
        Ok(Response::new(response))
    }

    async fn task_stats(
        &self,
        request: Request<TaskStatsRequest>,
    ) -> Result<Response<Self::TaskStatsStream>, Status> {
        let request = request.into_inner();
        let task = self.tasks.get(&request.task_id);
        let vm = task.as_ref().and_then(|task| task.vm());
        let cgroups = task.as_ref().map(|task| task.state().cgroups.clone());
        let compute = stats::CoreCompute::from_config(self.state.settings().nomad.as_ref());
        let interval = stats::interval_from(request.collection_interval.as_ref());
        Ok(Response::new(stats::open(
            request.task_id,
            vm,
            cgroups,
            interval,
            compute,
            self.shutdown.clone(),
        )))
    }

    async fn task_events(
        &self,
        _request: Request<TaskEventsRequest>,
    ) -> Result<Response<Self::TaskEventsStream>, Status> {
        Ok(Response::new(self.events.subscribe(self.shutdown.clone())))
    }

    async fn signal_task(
        &self,
        request: Request<SignalTaskRequest>,
    ) -> Result<Response<SignalTaskResponse>, Status> {
        self.signal_task(request.into_inner())
            .await
            .map_err(|error| reject("SignalTask", error))?;
        Ok(Response::new(SignalTaskResponse {}))
    }

    async fn exec_task(
        &self,
        _request: Request<ExecTaskRequest>,
    ) -> Result<Response<ExecTaskResponse>, Status> {
        Err(reject("ExecTask", DriverError::ExecUnsupported))
    }

    async fn exec_task_streaming(
        &self,
        _request: Request<Streaming<ExecTaskStreamingRequest>>,
    ) -> Result<Response<Self::ExecTaskStreamingStream>, Status> {
        Err(reject("ExecTaskStreaming", DriverError::ExecUnsupported))
    }

    async fn create_network(
        &self,
        _request: Request<CreateNetworkRequest>,
    ) -> Result<Response<CreateNetworkResponse>, Status> {
        Err(reject("CreateNetwork", DriverError::NetworkUnsupported))
    }

    async fn destroy_network(
        &self,
        _request: Request<DestroyNetworkRequest>,
    ) -> Result<Response<DestroyNetworkResponse>, Status> {
        Err(reject("DestroyNetwork", DriverError::NetworkUnsupported))
    }

    /// Acknowledges a graceful agent shutdown. VMs keep running so that the next plugin
    /// process can recover them.
    async fn shutdown(
        &self,
        _request: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownResponse>, Status> {
        tracing::info!(
            tasks = self.tasks.len(),
            "agent shutting down, VMs are left running"
        );
        Ok(Response::new(ShutdownResponse {}))
    }
}
