//! QMP client against real QEMU (`qemu-system-x86_64 -machine none`), over a unix socket and
//! over `-qmp stdio`. Each test starts its own QEMU, which boots no guest.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nomad_driver_qemu::qmp::{
    commands, Client, CloseReason, Config, Error, ErrorClass, EventKind, Events, Negotiating,
    RunState, ShutdownCause,
};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

const QEMU: &str = "qemu-system-x86_64";
const INSTALL_HINT: &str =
    "install it with `apt-get update && apt-get install -y qemu-system-x86 qemu-utils`";
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(5);

/// One QEMU with a QMP unix socket in a temporary directory. The process is killed on drop.
struct Qemu {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Qemu {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory for the QMP socket");
        let socket = dir.path().join("qmp.sock");
        let child = Command::new(QEMU)
            .args([
                "-machine",
                "none,accel=tcg",
                "-nodefaults",
                "-display",
                "none",
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .args(extra)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("failed to run {QEMU} ({e}): {INSTALL_HINT}"));
        Self {
            child,
            socket,
            _dir: dir,
        }
    }

    /// Connects and negotiates, retrying `connect` until QEMU listens (about 20 ms after spawn).
    async fn connect(&self) -> (Client, Events) {
        let stream = connect_with_retry(&self.socket).await;
        let mut session = Negotiating::new(stream, Config::default());
        let events = session.subscribe();
        let client = session
            .negotiate(NEGOTIATION_TIMEOUT)
            .await
            .expect("negotiate with QEMU");
        (client, events)
    }
}

async fn connect_with_retry(path: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(path).await {
            Ok(stream) => return stream,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(error) => panic!(
                "QEMU did not listen on {} within 10 s: {error}",
                path.display()
            ),
        }
    }
}

/// Waits at most 5 s for the next event.
async fn next_event(events: &mut Events) -> EventKind {
    tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("no event within 5 s")
        .expect("event stream ended")
        .kind
}

#[tokio::test]
async fn real_queries() {
    let qemu = Qemu::start(&["-name", "qmp-test-vm"]);
    let (client, _events) = qemu.connect().await;

    let version = client.call(&commands::QueryVersion).await.unwrap();
    assert_eq!(version, client.greeting().version);
    assert!(version.qemu.major >= 7, "{version:?}");

    let status = client.call(&commands::QueryStatus).await.unwrap();
    assert_eq!(status.status, RunState::Running);
    assert!(status.running);

    let name = client.call(&commands::QueryName).await.unwrap();
    assert_eq!(name.name.as_deref(), Some("qmp-test-vm"));

    let kvm = client.call(&commands::QueryKvm).await.unwrap();
    assert!(!kvm.enabled, "accel=tcg must not use KVM: {kvm:?}");

    let cpus = client.call(&commands::QueryCpusFast).await.unwrap();
    assert!(cpus.is_empty(), "-machine none has no vCPUs: {cpus:?}");
    let blocks = client
        .call(&commands::QueryBlockstats::default())
        .await
        .unwrap();
    assert!(blocks.is_empty(), "-nodefaults has no disks: {blocks:?}");
}

#[tokio::test]
async fn real_stop_cont_events() {
    let qemu = Qemu::start(&[]);
    let (client, mut events) = qemu.connect().await;

    client.call(&commands::Stop).await.unwrap();
    assert_eq!(next_event(&mut events).await, EventKind::Stop);
    let status = client.call(&commands::QueryStatus).await.unwrap();
    assert_eq!(status.status, RunState::Paused);
    assert!(!status.running);

    client.call(&commands::Cont).await.unwrap();
    assert_eq!(next_event(&mut events).await, EventKind::Resume);
    let status = client.call(&commands::QueryStatus).await.unwrap();
    assert_eq!(status.status, RunState::Running);
}

#[tokio::test]
async fn real_schema_within_max() {
    let qemu = Qemu::start(&[]);
    let (client, _events) = qemu.connect().await;

    let schema = client.execute("query-qmp-schema", None).await.unwrap();
    // About 186 KB as compact JSON on QEMU 7.2.22, larger than the read buffer's first
    // allocation, so the reply spans many reads.
    let size = schema.to_string().len();
    assert!(size > 100_000, "schema is only {size} bytes");
    let entries = schema.as_array().map(Vec::len).unwrap_or_default();
    assert!(entries > 1000, "schema has {entries} entries");
}

#[tokio::test]
async fn real_schema_over_max() {
    let qemu = Qemu::start(&[]);
    let stream = connect_with_retry(&qemu.socket).await;
    let config = Config {
        max_line_length: 64 * 1024,
        ..Config::default()
    };
    let client = Negotiating::new(stream, config)
        .negotiate(NEGOTIATION_TIMEOUT)
        .await
        .unwrap();

    let result = client.execute("query-qmp-schema", None).await;
    assert!(
        matches!(result, Err(Error::ConnectionClosed)),
        "expected ConnectionClosed, got {}",
        result.map_or_else(|e| e.to_string(), |_| "a reply".to_owned())
    );
    let reason = client.close_reason().expect("session closed");
    let CloseReason::Failed(error) = reason else {
        panic!("expected LineTooLong, got {reason:?}");
    };
    let Error::LineTooLong { size, max } = *error else {
        panic!("expected LineTooLong, got {error:?}");
    };
    assert_eq!(max, 64 * 1024);
    assert!(size > 100_000, "size {size}");
    println!("query-qmp-schema reply line: {size} bytes");
}

#[tokio::test]
async fn real_unknown_command() {
    let qemu = Qemu::start(&[]);
    let (client, _events) = qemu.connect().await;

    let error = client.execute("no-such-command", None).await.unwrap_err();
    let Error::Qmp {
        command,
        class,
        desc,
    } = error
    else {
        panic!("expected a QMP error, got {error:?}");
    };
    assert_eq!(command, "no-such-command");
    assert_eq!(class, ErrorClass::CommandNotFound);
    assert!(desc.contains("no-such-command"), "{desc}");

    // The session stays usable after an error reply.
    client.call(&commands::QueryStatus).await.unwrap();
}

#[tokio::test]
async fn real_quit_closes() {
    let mut qemu = Qemu::start(&[]);
    let (client, mut events) = qemu.connect().await;

    // `quit` and a command right behind it: QEMU may exit before it replies to either.
    let (quit, status) = tokio::join!(
        client.call(&commands::Quit),
        client.call(&commands::QueryStatus)
    );
    if let Err(error) = quit {
        assert!(matches!(error, Error::ConnectionClosed), "{error:?}");
    }
    if let Err(error) = status {
        assert!(matches!(error, Error::ConnectionClosed), "{error:?}");
    }

    let reason = tokio::time::timeout(Duration::from_secs(5), client.closed())
        .await
        .expect("session did not end within 5 s of quit");
    assert!(matches!(reason, CloseReason::Eof), "{reason:?}");
    let error = client.call(&commands::QueryStatus).await.unwrap_err();
    assert!(matches!(error, Error::ConnectionClosed), "{error:?}");

    assert_eq!(
        next_event(&mut events).await,
        EventKind::Shutdown {
            guest: false,
            reason: ShutdownCause::HostQmpQuit
        }
    );
    assert!(events.recv().await.is_none());
    let exit = tokio::time::timeout(Duration::from_secs(5), qemu.child.wait())
        .await
        .expect("QEMU did not exit within 5 s of quit")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn real_stdio_probe() {
    let mut child = Command::new(QEMU)
        .args([
            "-machine",
            "none,accel=tcg",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("failed to run {QEMU} ({e}): {INSTALL_HINT}"));
    let stdin = child.stdin.take().expect("piped stdin");
    let stdout = child.stdout.take().expect("piped stdout");

    let client = Negotiating::from_parts(stdout, stdin, Config::default())
        .negotiate(NEGOTIATION_TIMEOUT)
        .await
        .unwrap();
    let version = client.call(&commands::QueryVersion).await.unwrap();
    assert_eq!(version, client.greeting().version);
    let kvm = client.call(&commands::QueryKvm).await.unwrap();
    assert!(!kvm.enabled);

    if let Err(error) = client.call(&commands::Quit).await {
        assert!(matches!(error, Error::ConnectionClosed), "{error:?}");
    }
    let reason = tokio::time::timeout(Duration::from_secs(5), client.closed())
        .await
        .expect("session did not end within 5 s of quit");
    assert!(matches!(reason, CloseReason::Eof), "{reason:?}");
    let exit = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("QEMU did not exit within 5 s of quit")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}
