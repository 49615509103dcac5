//! Round-trip time of `query-status` against real QEMU (`-machine none`, TCG): this crate's
//! async client next to a minimal blocking client on a plain socket, which is the floor.
//!
//! Run with `cargo bench --bench qmp_roundtrip`. Prints the median and p99 of 1000 calls each.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nomad_driver_qemu::qmp::{commands, Config, Negotiating};

const CALLS: usize = 1000;

fn main() {
    let dir = tempfile::tempdir().expect("create a temporary directory for the QMP socket");
    let socket = dir.path().join("qmp.sock");
    let mut qemu = start_qemu(&socket);

    let floor = blocking_round_trips(&socket);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime");
    let ours = runtime.block_on(client_round_trips(&socket));

    println!("query-status round trip, {CALLS} sequential calls, QEMU -machine none:");
    report("blocking raw socket (floor)", floor);
    report("qmp::Client", ours);

    let _ = qemu.kill();
    let _ = qemu.wait();
}

fn start_qemu(socket: &Path) -> Child {
    let child = Command::new("qemu-system-x86_64")
        .args(["-machine", "none,accel=tcg", "-nodefaults", "-display", "none"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("failed to run qemu-system-x86_64 ({e}): install it with `apt-get install -y qemu-system-x86`")
        });
    let deadline = Instant::now() + Duration::from_secs(10);
    while StdUnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "QEMU did not listen within 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The probe connection above has closed, so QEMU greets the next client at once.
    child
}

fn blocking_round_trips(socket: &Path) -> Vec<Duration> {
    let mut stream = StdUnixStream::connect(socket).expect("connect to QEMU");
    let mut reader = BufReader::new(stream.try_clone().expect("clone the socket"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("read the greeting");
    stream
        .write_all(br#"{"execute": "qmp_capabilities"}"#)
        .expect("send qmp_capabilities");
    line.clear();
    reader
        .read_line(&mut line)
        .expect("read the qmp_capabilities reply");

    let mut samples = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let started = Instant::now();
        stream
            .write_all(br#"{"execute": "query-status"}"#)
            .expect("send query-status");
        line.clear();
        reader.read_line(&mut line).expect("read the reply");
        samples.push(started.elapsed());
        assert!(line.contains("\"return\""), "unexpected reply: {line}");
    }
    samples
}

async fn client_round_trips(socket: &Path) -> Vec<Duration> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect to QEMU");
    let client = Negotiating::new(stream, Config::default())
        .negotiate(Duration::from_secs(5))
        .await
        .expect("negotiate with QEMU");

    let mut samples = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let started = Instant::now();
        client
            .call(&commands::QueryStatus)
            .await
            .expect("query-status");
        samples.push(started.elapsed());
    }
    samples
}

fn report(label: &str, mut samples: Vec<Duration>) {
    samples.sort_unstable();
    let median = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    println!(
        "  {label:<30} median {:>7.3} ms   p99 {:>7.3} ms",
        median.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
}
