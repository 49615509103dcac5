//! The plugin process as Nomad's client sees it: the built binary is started with the magic
//! cookie, its handshake line is read, and every call goes over its Unix socket with tonic.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use nomad_driver_qemu::driver::nomad::plugin::MAGIC_COOKIE_KEY;
use nomad_driver_qemu::driver::nomad::proto::base::{
    base_plugin_client::BasePluginClient, ConfigSchemaRequest, NomadConfig, NomadDriverConfig,
    PluginInfoRequest, PluginType, SetConfigRequest,
};
use nomad_driver_qemu::driver::nomad::proto::drivers::{
    driver_capabilities::{FsIsolation, MountConfigs},
    driver_client::DriverClient,
    fingerprint_response::HealthState,
    network_isolation_spec::NetworkIsolationMode,
    CapabilitiesRequest, DestroyTaskRequest, ExecTaskRequest, FingerprintRequest, StopTaskRequest,
    TaskConfigSchemaRequest, WaitTaskRequest,
};
use nomad_driver_qemu::driver::nomad::proto::go_plugin::{
    grpc_controller_client::GrpcControllerClient, Empty,
};
use nomad_driver_qemu::driver::nomad::proto::hclspec::spec::Block;
use rustix::process::{kill_process, Signal};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use tonic::Code;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

use crate::support::plugin::{plugin_config, PluginProcess, REPLY_LIMIT};

/// A running plugin process started as Nomad starts it, with its stderr lines collected.
struct Plugin {
    process: PluginProcess,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_reader: tokio::task::JoinHandle<()>,
}

impl Plugin {
    /// Starts the binary with the magic cookie and checks its handshake line.
    async fn start() -> Plugin {
        let mut process = PluginProcess::start(&[], Stdio::piped()).await;

        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_reader = {
            let lines = Arc::clone(&stderr);
            let mut reader = BufReader::new(process.take_stderr()).lines();
            tokio::spawn(async move {
                while let Ok(Some(line)) = reader.next_line().await {
                    lines.lock().expect("stderr lock").push(line);
                }
            })
        };

        let handshake = process.handshake();
        let fields: Vec<&str> = handshake.trim_end_matches('\n').split('|').collect();
        assert_eq!(fields.len(), 6, "handshake {handshake:?}");
        assert_eq!(fields[0], "1", "core protocol in {handshake:?}");
        assert_eq!(fields[1], "2", "app protocol in {handshake:?}");
        assert_eq!(fields[2], "unix", "network in {handshake:?}");
        assert_eq!(fields[4], "grpc", "protocol in {handshake:?}");
        assert_eq!(fields[5], "", "certificate field in {handshake:?}");
        let socket = process.socket();
        assert_eq!(socket.parent(), Some(process.socket_dir()), "socket dir");
        assert!(socket.as_os_str().len() < 108, "socket path length");

        // Nothing may follow the handshake on stdout.
        let mut stdout = process.take_stdout();
        tokio::spawn(async move {
            let mut rest = String::new();
            let _ = stdout.read_to_string(&mut rest).await;
            assert!(rest.is_empty(), "stdout after the handshake: {rest:?}");
        });

        Plugin {
            process,
            stderr,
            stderr_reader,
        }
    }

    /// Returns every stderr line, after the process closed stderr.
    async fn stderr_lines(self) -> Vec<String> {
        self.stderr_reader.await.expect("stderr reader");
        let lines = self.stderr.lock().expect("stderr lock").clone();
        lines
    }
}

/// Checks that every line is an hclog JSON record that Nomad's client accepts.
fn assert_hclog_lines(lines: &[String]) {
    assert!(!lines.is_empty(), "no log lines");
    for line in lines {
        let record: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}"));
        let level = record["@level"]
            .as_str()
            .unwrap_or_else(|| panic!("@level in {line}"));
        assert!(
            ["trace", "debug", "info", "warn", "error"].contains(&level),
            "@level in {line}"
        );
        assert!(record["@message"].is_string(), "@message in {line}");
        let timestamp = record["@timestamp"]
            .as_str()
            .unwrap_or_else(|| panic!("@timestamp in {line}"));
        let fraction = timestamp
            .split_once('.')
            .and_then(|(_, rest)| rest.strip_suffix('Z'))
            .unwrap_or_else(|| panic!("@timestamp fraction in {line}"));
        assert_eq!(fraction.len(), 6, "@timestamp in {line}");
    }
}

#[tokio::test]
async fn plugin_serves_base_and_driver() {
    let mut plugin = Plugin::start().await;
    let channel = plugin.process.connect().await;
    let mut base = BasePluginClient::new(channel.clone());
    let mut driver = DriverClient::new(channel.clone());

    let info = base
        .plugin_info(PluginInfoRequest {})
        .await
        .expect("PluginInfo")
        .into_inner();
    assert_eq!(info.r#type, PluginType::Driver as i32);
    assert_eq!(info.plugin_api_versions, ["0.1.0"]);
    assert_eq!(info.plugin_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(info.name, "qemu");

    let schema = base
        .config_schema(ConfigSchemaRequest {})
        .await
        .expect("ConfigSchema");
    let Some(Block::Object(object)) = schema.into_inner().spec.and_then(|spec| spec.block) else {
        panic!("config schema root is not an object");
    };
    assert!(object.attributes.contains_key("image_paths"));

    // The validation instance: no nomad_config.
    base.set_config(SetConfigRequest {
        msgpack_config: plugin_config(&[]),
        nomad_config: None,
        plugin_api_version: "0.1.0".into(),
    })
    .await
    .expect("SetConfig without nomad_config");

    // The real instance.
    base.set_config(SetConfigRequest {
        msgpack_config: plugin_config(&["/srv/images"]),
        nomad_config: Some(NomadConfig {
            driver: Some(NomadDriverConfig {
                client_max_port: 14512,
                client_min_port: 14000,
                topology: None,
            }),
        }),
        plugin_api_version: "0.1.0".into(),
    })
    .await
    .expect("SetConfig with nomad_config");

    let error = base
        .set_config(SetConfigRequest {
            msgpack_config: plugin_config(&["relative/dir"]),
            nomad_config: None,
            plugin_api_version: "0.1.0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("relative/dir"),
        "{}",
        error.message()
    );

    let capabilities = driver
        .capabilities(CapabilitiesRequest {})
        .await
        .expect("Capabilities")
        .into_inner()
        .capabilities
        .expect("capabilities present");
    assert!(capabilities.send_signals);
    assert!(!capabilities.exec);
    assert_eq!(capabilities.fs_isolation, FsIsolation::None as i32);
    assert_eq!(
        capabilities.network_isolation_modes,
        [
            NetworkIsolationMode::Host as i32,
            NetworkIsolationMode::Group as i32
        ]
    );
    assert_eq!(capabilities.mount_configs, MountConfigs::NoMounts as i32);

    let task_schema = driver
        .task_config_schema(TaskConfigSchemaRequest {})
        .await
        .expect("TaskConfigSchema");
    let Some(Block::Object(object)) = task_schema.into_inner().spec.and_then(|spec| spec.block)
    else {
        panic!("task schema root is not an object");
    };
    assert!(object.attributes.contains_key("image_path"));
    assert!(object.attributes.contains_key("port_map"));

    let mut fingerprints = driver
        .fingerprint(FingerprintRequest {})
        .await
        .expect("Fingerprint")
        .into_inner();
    let first = tokio::time::timeout(REPLY_LIMIT, fingerprints.next())
        .await
        .expect("first fingerprint within the limit")
        .expect("stream open")
        .expect("fingerprint, not an error");
    assert_eq!(
        first.health,
        HealthState::Healthy as i32,
        "{} (install QEMU: apt-get install qemu-system-x86)",
        first.health_description
    );
    assert!(
        first.attributes.contains_key("driver.qemu.version"),
        "{first:?}"
    );
    // The stream stays open: nothing more arrives for a while, and it does not end.
    let idle = tokio::time::timeout(Duration::from_millis(500), fingerprints.next()).await;
    assert!(idle.is_err(), "fingerprint stream yielded {idle:?}");

    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(HealthCheckRequest {
            service: "plugin".into(),
        })
        .await
        .expect("Health/Check")
        .into_inner();
    assert_eq!(status.status, 1, "SERVING");

    driver
        .stop_task(StopTaskRequest {
            task_id: "unknown/web/00000000".into(),
            timeout: None,
            signal: String::new(),
        })
        .await
        .expect("StopTask of an unknown id is OK");
    driver
        .destroy_task(DestroyTaskRequest {
            task_id: "unknown/web/00000000".into(),
            force: true,
        })
        .await
        .expect("DestroyTask of an unknown id is OK");
    let error = driver
        .wait_task(WaitTaskRequest {
            task_id: "unknown/web/00000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error}");
    let error = driver
        .exec_task(ExecTaskRequest {
            task_id: "unknown/web/00000000".into(),
            command: vec!["true".into()],
            timeout: None,
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unimplemented, "{error}");
    assert!(error.message().contains("exec is not supported"), "{error}");

    let mut controller = GrpcControllerClient::new(channel);
    controller
        .shutdown(Empty {})
        .await
        .expect("Controller/Shutdown");
    drop(fingerprints);

    let status = plugin.process.wait_exit().await;
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(
        !plugin.process.socket().exists(),
        "socket {} left behind",
        plugin.process.socket().display()
    );
    assert_hclog_lines(&plugin.stderr_lines().await);
}

#[tokio::test]
async fn plugin_ignores_sigint_stops_on_sigterm() {
    let mut plugin = Plugin::start().await;

    kill_process(plugin.process.pid(), Signal::INT).expect("send SIGINT");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut base = BasePluginClient::new(plugin.process.connect().await);
    base.plugin_info(PluginInfoRequest {})
        .await
        .expect("PluginInfo after SIGINT");

    kill_process(plugin.process.pid(), Signal::TERM).expect("send SIGTERM");
    let status = plugin.process.wait_exit().await;
    assert!(status.success(), "{status}");
    assert!(
        !plugin.process.socket().exists(),
        "socket {} left behind",
        plugin.process.socket().display()
    );
    let lines = plugin.stderr_lines().await;
    assert_hclog_lines(&lines);
    assert!(
        lines.iter().any(|line| line.contains("SIGINT ignored")),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn plugin_name_from_flag() {
    let mut plugin = PluginProcess::start(&["--plugin-name", "qemu-qmp"], Stdio::null()).await;
    let channel = plugin.connect().await;
    let info = BasePluginClient::new(channel.clone())
        .plugin_info(PluginInfoRequest {})
        .await
        .expect("PluginInfo")
        .into_inner();
    assert_eq!(info.name, "qemu-qmp");

    GrpcControllerClient::new(channel)
        .shutdown(Empty {})
        .await
        .expect("Controller/Shutdown");
    let status = plugin.wait_exit().await;
    assert_eq!(status.code(), Some(0));
    let socket = plugin.socket();
    assert!(!socket.exists(), "socket {} left behind", socket.display());
}

#[tokio::test]
async fn plugin_without_cookie_exits_1() {
    let output = Command::new(env!("CARGO_BIN_EXE_nomad-driver-qemu"))
        .env_remove(MAGIC_COOKIE_KEY)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("binary runs");

    assert_eq!(output.status.code(), Some(1));
    assert!(
        output.stdout.is_empty(),
        "stdout: {:?}",
        String::from_utf8_lossy(&output.stdout)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Nomad task driver plugin"), "{stderr}");
    assert!(stderr.contains("--help"), "{stderr}");
}
