//! QMP client against a scripted fake server: faults that real QEMU does not produce on demand.
//! Every case has a defined result within a bounded time.

use std::path::Path;
use std::time::{Duration, Instant};

use nomad_driver_qemu::qmp::{
    commands, Client, CloseReason, Config, Error, EventKind, Negotiating, ShutdownCause,
};
use serde_json::json;
use tokio::net::UnixStream;

use crate::fake_qmp::{event, negotiation, script_from_transcript, FakeQmp, Step};

const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(5);

async fn session(
    server: &FakeQmp,
    config: Config,
) -> Negotiating<impl tokio::io::AsyncRead, impl tokio::io::AsyncWrite> {
    let stream = UnixStream::connect(server.path())
        .await
        .expect("connect to the fake QMP socket");
    Negotiating::new(stream, config)
}

async fn connect(server: &FakeQmp, config: Config) -> Client {
    session(server, config)
        .await
        .negotiate(NEGOTIATION_TIMEOUT)
        .await
        .expect("negotiate with the fake server")
}

fn script(steps: impl IntoIterator<Item = Step>) -> Vec<Step> {
    let mut script = negotiation();
    script.extend(steps);
    script
}

#[tokio::test]
async fn faults_events_before_greeting() {
    let server = FakeQmp::start(vec![
        event("RESUME", None),
        event("BALLOON_CHANGE", Some(json!({"actual": 134217728}))),
        Step::Line(crate::fake_qmp::GREETING.to_owned()),
        Step::Expect("qmp_capabilities".to_owned()),
        event("STOP", None),
        Step::Reply(json!({})),
        Step::WaitForClose,
    ]);
    let mut session = session(&server, Config::default()).await;
    let mut events = session.subscribe();
    let client = session.negotiate(NEGOTIATION_TIMEOUT).await.unwrap();

    assert_eq!(events.recv().await.unwrap().kind, EventKind::Resume);
    assert_eq!(
        events.recv().await.unwrap().kind,
        EventKind::BalloonChange { actual: 134217728 }
    );
    assert_eq!(events.recv().await.unwrap().kind, EventKind::Stop);
    assert_eq!(client.greeting().version.qemu.minor, 2);
    drop(client);
    server.finish().await.unwrap();
}

#[tokio::test]
async fn faults_large_reply() {
    let big = "x".repeat(3 * 1024 * 1024);
    let server = FakeQmp::start(script([
        Step::Expect("query-qmp-schema".to_owned()),
        Step::Reply(json!([{"name": big}])),
        Step::WaitForClose,
    ]));
    let client = connect(&server, Config::default()).await;
    let reply = client.execute("query-qmp-schema", None).await.unwrap();
    assert_eq!(
        reply[0]["name"].as_str().map(str::len),
        Some(3 * 1024 * 1024)
    );
    drop(client);
    server.finish().await.unwrap();
}

#[tokio::test]
async fn faults_line_over_max() {
    let server = FakeQmp::start(script([
        Step::Expect("query-qmp-schema".to_owned()),
        Step::Reply(json!("y".repeat(200_000))),
        Step::WaitForClose,
    ]));
    let config = Config {
        max_line_length: 64 * 1024,
        ..Config::default()
    };
    let client = connect(&server, config).await;
    let error = client.execute("query-qmp-schema", None).await.unwrap_err();
    assert!(matches!(error, Error::ConnectionClosed), "{error:?}");
    match client.close_reason() {
        Some(CloseReason::Failed(error)) => {
            let Error::LineTooLong { size, max } = *error else {
                panic!("expected LineTooLong, got {error:?}");
            };
            assert_eq!(max, 64 * 1024);
            assert!(size > 200_000, "size {size}");
        }
        other => panic!("expected LineTooLong, got {other:?}"),
    }
    drop(client);
    server.finish().await.unwrap();
}

#[tokio::test]
async fn faults_eof_mid_line() {
    let server = FakeQmp::start(script([
        Step::Expect("query-status".to_owned()),
        Step::Raw(br#"{"return": {"status": "runn"#.to_vec()),
    ]));
    let client = connect(&server, Config::default()).await;
    let error = client.call(&commands::QueryStatus).await.unwrap_err();
    assert!(matches!(error, Error::ConnectionClosed), "{error:?}");
    let reason = client.closed().await;
    assert!(
        matches!(&reason, CloseReason::Failed(e) if matches!(**e, Error::TruncatedLine { len: 27 })),
        "{reason:?}"
    );
    server.finish().await.unwrap();
}

#[tokio::test]
async fn faults_non_json_line() {
    let server = FakeQmp::start(script([
        Step::Expect("query-status".to_owned()),
        Step::Line("Segmentation fault (core dumped)".to_owned()),
        Step::Reply(json!({"status": "paused", "running": false})),
        Step::WaitForClose,
    ]));
    let client = connect(&server, Config::default()).await;
    let status = client.call(&commands::QueryStatus).await.unwrap();
    assert_eq!(status.status, nomad_driver_qemu::qmp::RunState::Paused);
    assert_eq!(status.singlestep, None);
    assert_eq!(client.counters().invalid_lines, 1);
    assert!(!client.is_closed());
    drop(client);
    server.finish().await.unwrap();
}

#[tokio::test]
async fn faults_unknown_event() {
    let server = FakeQmp::start(script([
        event(
            "VSERPORT_CHANGE",
            Some(json!({"id": "channel0", "open": true})),
        ),
        event(
            "SHUTDOWN",
            Some(json!({"guest": true, "reason": "guest-shutdown"})),
        ),
    ]));
    let mut session = session(&server, Config::default()).await;
    let mut events = session.subscribe();
    let client = session.negotiate(NEGOTIATION_TIMEOUT).await.unwrap();

    let first = events.recv().await.unwrap();
    assert_eq!(
        first.kind,
        EventKind::Other {
            name: "VSERPORT_CHANGE".to_owned(),
            data: Some(json!({"id": "channel0", "open": true})),
        }
    );
    assert_eq!(first.timestamp.seconds, 1796417838);
    let second = events.recv().await.unwrap();
    assert_eq!(
        second.kind,
        EventKind::Shutdown {
            guest: true,
            reason: ShutdownCause::GuestShutdown
        }
    );
    assert_eq!(events.recv().await, None);
    assert!(matches!(client.closed().await, CloseReason::Eof));
    server.finish().await.unwrap();
}

#[tokio::test]
async fn faults_unknown_id() {
    let server = FakeQmp::start(script([
        Step::Expect("query-kvm".to_owned()),
        Step::ReplyWithId(json!(4242), json!({"enabled": true, "present": true})),
        Step::ReplyWithId(json!("foreign"), json!({})),
        Step::Reply(json!({"enabled": false, "present": true})),
        Step::WaitForClose,
    ]));
    let client = connect(&server, Config::default()).await;
    let kvm = client.call(&commands::QueryKvm).await.unwrap();
    assert!(!kvm.enabled);
    assert_eq!(client.counters().unexpected_messages, 2);
    drop(client);
    server.finish().await.unwrap();
}

#[tokio::test]
async fn faults_silent_server() {
    let server = FakeQmp::start(vec![Step::WaitForClose]);
    let started = Instant::now();
    let error = session(&server, Config::default())
        .await
        .negotiate(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::NegotiationTimedOut { .. }),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(300) + Duration::from_secs(2));
    // The failed negotiation closed the stream, so the server saw EOF.
    server.finish().await.unwrap();
}

#[tokio::test]
async fn faults_reset_is_eof() {
    // Closing a unix socket with unread input makes the kernel reset the connection, as QEMU's
    // socket does after `quit` with a trailing newline.
    let server = FakeQmp::start(script([Step::Sleep(Duration::from_millis(200))]));
    let client = connect(&server, Config::default()).await;
    let error = client.execute("query-status", None).await.unwrap_err();
    assert!(matches!(error, Error::ConnectionClosed), "{error:?}");
    assert!(matches!(client.closed().await, CloseReason::Eof));
    server.finish().await.unwrap();
}

#[tokio::test]
async fn faults_replay_transcript() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/transcripts/probe-machine-none.jsonl");
    let server = FakeQmp::start(script_from_transcript(&path));
    let mut session = session(&server, Config::default()).await;
    let mut events = session.subscribe();
    let client = session.negotiate(NEGOTIATION_TIMEOUT).await.unwrap();

    let version = client.call(&commands::QueryVersion).await.unwrap();
    assert_eq!(version, client.greeting().version);
    let kvm = client.call(&commands::QueryKvm).await.unwrap();
    assert!(kvm.present);
    client.call(&commands::Quit).await.unwrap();
    let shutdown = events.recv().await.unwrap();
    assert_eq!(
        shutdown.kind,
        EventKind::Shutdown {
            guest: false,
            reason: ShutdownCause::HostQmpQuit
        }
    );
    assert!(matches!(client.closed().await, CloseReason::Eof));
    server.finish().await.unwrap();
}
