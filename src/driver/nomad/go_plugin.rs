//! go-plugin's internal services, which Nomad's plugin client calls on every connection
//! (go-plugin v1.8.0 `grpc_client.go`, `grpc_controller.go`, `grpc_stdio.go`, `grpc_broker.go`).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::proto::go_plugin::{
    grpc_broker_server::GrpcBroker, grpc_controller_server::GrpcController,
    grpc_stdio_server::GrpcStdio, ConnInfo, Empty, StdioData,
};

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// `plugin.GRPCController`: Nomad calls `Shutdown` whenever it kills the plugin, then waits
/// 2 s before it sends SIGKILL.
pub struct Controller {
    shutdown: CancellationToken,
}

impl Controller {
    /// Creates a controller that cancels `shutdown` when Nomad requests the plugin to exit.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self { shutdown }
    }
}

#[tonic::async_trait]
impl GrpcController for Controller {
    async fn shutdown(&self, _request: Request<Empty>) -> Result<Response<Empty>, Status> {
        tracing::info!("Nomad requested plugin shutdown, running VMs are left running");
        // The server stops after this reply is sent: cancelling only starts the shutdown.
        self.shutdown.cancel();
        Ok(Response::new(Empty {}))
    }
}

/// `plugin.GRPCStdio`: the plugin writes nothing to stdout or stderr that needs mirroring, so
/// the stream stays open and silent until the client or the plugin shuts down.
pub struct Stdio {
    shutdown: CancellationToken,
}

impl Stdio {
    /// Creates the service; its streams end when `shutdown` is cancelled.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self { shutdown }
    }
}

#[tonic::async_trait]
impl GrpcStdio for Stdio {
    type StreamStdioStream = ResponseStream<StdioData>;

    async fn stream_stdio(
        &self,
        _request: Request<()>,
    ) -> Result<Response<Self::StreamStdioStream>, Status> {
        let shutdown = self.shutdown.clone().cancelled_owned();
        let silent = futures::stream::once(shutdown).filter_map(|()| async { None });
        Ok(Response::new(Box::pin(silent)))
    }
}

/// `plugin.GRPCBroker`: Nomad drivers never broker extra connections, so incoming messages
/// are read and dropped, and nothing is sent.
pub struct Broker {
    shutdown: CancellationToken,
}

impl Broker {
    /// Creates the service; its streams end when `shutdown` is cancelled.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self { shutdown }
    }
}

#[tonic::async_trait]
impl GrpcBroker for Broker {
    type StartStreamStream = ResponseStream<ConnInfo>;

    async fn start_stream(
        &self,
        request: Request<Streaming<ConnInfo>>,
    ) -> Result<Response<Self::StartStreamStream>, Status> {
        let mut incoming = request.into_inner();
        let shutdown = self.shutdown.clone();
        let drained = async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    message = incoming.next() => match message {
                        Some(Ok(info)) => {
                            tracing::debug!(service_id = info.service_id, "ignoring broker message");
                        }
                        Some(Err(_)) | None => break,
                    },
                }
            }
        };
        let silent = futures::stream::once(drained).filter_map(|()| async { None });
        Ok(Response::new(Box::pin(silent)))
    }
}
