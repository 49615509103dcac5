//! Round-trip time of `query-status` against real QEMU (`-machine none`, TCG), for six
//! clients side by side:
//!
//! * a minimal blocking client on a plain socket that sends an `id` as every client with
//!   reply routing must, which is the floor;
//! * the same blocking client without an `id`: QEMU 7.2 replies about 40 us sooner then;
//! * the floor's loop on tokio (current-thread), which is the floor for any client built on
//!   tokio's reactor;
//! * this crate's [`Client`] on a current-thread tokio runtime;
//! * the same client on a multi-thread runtime with 2 workers, as the plugin runs it;
//! * Python's `qemu.qmp` library, driven by `benches/qmp_python.py`.
//!
//! Each client has its own QMP socket on the same QEMU. A run makes `CALLS` sequential calls
//! per client, in batches of `BATCH`, and the clients take turns batch by batch in a rotating
//! order, so load from other processes hits all of them alike. The table shows the median over
//! `RUNS` runs of each run's median and p99, with the minimum and maximum in brackets, and each
//! client's median divided by the floor's median of the same run.
//!
//! Run with `cargo bench --bench qmp_roundtrip` (or `scripts/bench.sh`). Needs
//! `qemu-system-x86_64` and the Python package `qemu.qmp`. To profile one client, name it
//! after `--`: `no-id`, `tokio-raw`, `current-thread`, `multi-thread` or `python`; the floor
//! always runs.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use nomad_driver_qemu::qmp::{commands, Client, Config, Negotiating};

const RUNS: usize = 5;
const CALLS: usize = 1000;
const BATCH: usize = 100;

fn main() {
    let dir = tempfile::tempdir().expect("create a temporary directory for the QMP sockets");
    let sockets: Vec<PathBuf> = (0..6)
        .map(|i| dir.path().join(format!("qmp{i}.sock")))
        .collect();
    let _qemu = start_qemu(&sockets);

    // Cargo passes `--bench` to the binary; other arguments select clients.
    let selected: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with("--"))
        .collect();
    let is_selected = |name: &str| selected.is_empty() || selected.iter().any(|arg| arg == name);
    let mut clients: Vec<Box<dyn Bench>> = vec![Box::new(RawClient::connect(&sockets[0], true))];
    if is_selected("no-id") {
        clients.push(Box::new(RawClient::connect(&sockets[5], false)));
    }
    if is_selected("tokio-raw") {
        clients.push(Box::new(TokioRawClient::connect(&sockets[4])));
    }
    if is_selected("current-thread") {
        clients.push(Box::new(CrateClient::connect(
            &sockets[1],
            Flavor::CurrentThread,
        )));
    }
    if is_selected("multi-thread") {
        clients.push(Box::new(CrateClient::connect(
            &sockets[2],
            Flavor::MultiThread,
        )));
    }
    if is_selected("python") {
        clients.push(Box::new(PythonClient::connect(&sockets[3])));
    }

    // Warm up every client (page faults, lazy allocations, Python's bytecode cache).
    for client in &mut clients {
        client.batch(BATCH);
    }

    let mut runs: Vec<Vec<Summary>> = vec![Vec::new(); clients.len()];
    for _ in 0..RUNS {
        let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(CALLS); clients.len()];
        for batch in 0..CALLS / BATCH {
            for turn in 0..clients.len() {
                let index = (batch + turn) % clients.len();
                samples[index].extend(clients[index].batch(BATCH));
            }
        }
        let floor_median = median(&mut samples[0].clone());
        for (index, client_samples) in samples.into_iter().enumerate() {
            runs[index].push(Summary::of(client_samples, floor_median));
        }
    }

    println!(
        "query-status round trip, QEMU -machine none, {RUNS} runs x {CALLS} calls per client, \
         interleaved in batches of {BATCH}"
    );
    println!("median of the runs [min - max]; times in ms\n");
    println!("| client | median | p99 | median / floor |");
    println!("|---|---|---|---|");
    for (client, runs) in clients.iter().zip(&runs) {
        println!(
            "| {} | {} | {} | {} |",
            client.label(),
            spread(runs.iter().map(|run| run.median_ms), 3),
            spread(runs.iter().map(|run| run.p99_ms), 3),
            spread(runs.iter().map(|run| run.ratio), 2),
        );
    }
}

/// Kills QEMU when dropped, also when the benchmark panics.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One client under test.
trait Bench {
    fn label(&self) -> &'static str;
    /// Makes `calls` sequential `query-status` calls and returns each round-trip time.
    fn batch(&mut self, calls: usize) -> Vec<Duration>;
}

/// Median, p99 and median relative to the floor, of one client in one run.
#[derive(Clone, Copy)]
struct Summary {
    median_ms: f64,
    p99_ms: f64,
    ratio: f64,
}

impl Summary {
    fn of(mut samples: Vec<Duration>, floor_median: Duration) -> Self {
        let middle = median(&mut samples);
        Self {
            median_ms: middle.as_secs_f64() * 1e3,
            p99_ms: samples[samples.len() * 99 / 100].as_secs_f64() * 1e3,
            ratio: middle.as_secs_f64() / floor_median.as_secs_f64(),
        }
    }
}

/// Sorts `samples` and returns the middle one.
fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// Formats the median of `values` with their minimum and maximum.
fn spread(values: impl Iterator<Item = f64>, decimals: usize) -> String {
    let mut values: Vec<f64> = values.collect();
    values.sort_unstable_by(f64::total_cmp);
    let middle = values[values.len() / 2];
    let (low, high) = (values[0], values[values.len() - 1]);
    format!("{middle:.decimals$} [{low:.decimals$} - {high:.decimals$}]")
}

fn start_qemu(sockets: &[PathBuf]) -> KillOnDrop {
    let mut command = Command::new("qemu-system-x86_64");
    command.args([
        "-machine",
        "none,accel=tcg",
        "-nodefaults",
        "-display",
        "none",
    ]);
    for socket in sockets {
        command
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()));
    }
    let child = command.stdin(Stdio::null()).spawn().unwrap_or_else(|e| {
        panic!("failed to run qemu-system-x86_64 ({e}): install it with `apt-get install -y qemu-system-x86`")
    });
    let child = KillOnDrop(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    for socket in sockets {
        // Each probe connection closes at once, so QEMU greets the next client on the socket.
        while StdUnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "QEMU did not listen within 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    child
}

/// The floor: blocking writes and reads on a plain socket, no parsing beyond a substring check.
struct RawClient {
    stream: StdUnixStream,
    reader: BufReader<StdUnixStream>,
    line: String,
    /// The next request `id`, or `None` to send requests without one.
    next_id: Option<u64>,
}

impl RawClient {
    fn connect(socket: &Path, with_id: bool) -> Self {
        let stream = StdUnixStream::connect(socket).expect("connect to QEMU");
        let reader = BufReader::new(stream.try_clone().expect("clone the socket"));
        let mut client = Self {
            stream,
            reader,
            line: String::new(),
            next_id: with_id.then_some(1),
        };
        client.read_line();
        client
            .stream
            .write_all(br#"{"execute": "qmp_capabilities"}"#)
            .expect("send qmp_capabilities");
        client.read_line();
        client
    }

    fn read_line(&mut self) {
        self.line.clear();
        self.reader
            .read_line(&mut self.line)
            .expect("read a line from QEMU");
    }
}

impl Bench for RawClient {
    fn label(&self) -> &'static str {
        match self.next_id {
            Some(_) => "blocking raw socket, with id (floor)",
            None => "blocking raw socket, no id",
        }
    }

    fn batch(&mut self, calls: usize) -> Vec<Duration> {
        let mut samples = Vec::with_capacity(calls);
        let mut request = Vec::with_capacity(64);
        for _ in 0..calls {
            request.clear();
            match &mut self.next_id {
                Some(id) => {
                    write!(request, r#"{{"execute":"query-status","id":{id}}}"#)
                        .expect("format the request");
                    *id += 1;
                }
                None => request.extend_from_slice(br#"{"execute":"query-status"}"#),
            }
            let started = Instant::now();
            self.stream.write_all(&request).expect("send query-status");
            self.read_line();
            samples.push(started.elapsed());
            assert!(
                self.line.contains("\"return\""),
                "unexpected reply: {}",
                self.line
            );
        }
        samples
    }
}

/// The floor's loop on tokio: one task writes and reads the same socket, with no reader task,
/// no routing and no deadline.
struct TokioRawClient {
    runtime: tokio::runtime::Runtime,
    stream: tokio::io::BufReader<tokio::net::UnixStream>,
}

impl TokioRawClient {
    fn connect(socket: &Path) -> Self {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("build a tokio runtime");
        let stream = runtime.block_on(async {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .expect("connect to QEMU");
            let mut stream = tokio::io::BufReader::new(stream);
            let mut line = String::new();
            stream
                .read_line(&mut line)
                .await
                .expect("read the greeting");
            stream
                .write_all(br#"{"execute": "qmp_capabilities"}"#)
                .await
                .expect("send qmp_capabilities");
            line.clear();
            stream
                .read_line(&mut line)
                .await
                .expect("read the qmp_capabilities reply");
            stream
        });
        Self { runtime, stream }
    }
}

impl Bench for TokioRawClient {
    fn label(&self) -> &'static str {
        "tokio raw socket, with id, no reader task"
    }

    fn batch(&mut self, calls: usize) -> Vec<Duration> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

        let stream = &mut self.stream;
        self.runtime.block_on(async move {
            let mut samples = Vec::with_capacity(calls);
            let mut line = String::new();
            let mut request = Vec::with_capacity(64);
            for id in 1..=calls {
                request.clear();
                write!(request, r#"{{"execute":"query-status","id":{id}}}"#)
                    .expect("format the request");
                let started = Instant::now();
                stream.write_all(&request).await.expect("send query-status");
                line.clear();
                stream.read_line(&mut line).await.expect("read the reply");
                samples.push(started.elapsed());
                assert!(line.contains("\"return\""), "unexpected reply: {line}");
            }
            samples
        })
    }
}

#[derive(Clone, Copy)]
enum Flavor {
    CurrentThread,
    MultiThread,
}

/// This crate's client. On the multi-thread runtime the calls run in a spawned task, as the
/// plugin's gRPC handlers do, so the reply may cross worker threads.
struct CrateClient {
    runtime: tokio::runtime::Runtime,
    client: Client,
    flavor: Flavor,
}

impl CrateClient {
    fn connect(socket: &Path, flavor: Flavor) -> Self {
        let runtime = match flavor {
            Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            Flavor::MultiThread => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build(),
        }
        .expect("build a tokio runtime");
        let client = runtime.block_on(async {
            let stream = tokio::net::UnixStream::connect(socket)
                .await
                .expect("connect to QEMU");
            Negotiating::new(stream, Config::default())
                .negotiate(Duration::from_secs(5))
                .await
                .expect("negotiate with QEMU")
        });
        Self {
            runtime,
            client,
            flavor,
        }
    }
}

async fn client_batch(client: Client, calls: usize) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        client
            .call(&commands::QueryStatus)
            .await
            .expect("query-status");
        samples.push(started.elapsed());
    }
    samples
}

impl Bench for CrateClient {
    fn label(&self) -> &'static str {
        match self.flavor {
            Flavor::CurrentThread => "qmp::Client, current-thread runtime",
            Flavor::MultiThread => "qmp::Client, multi-thread runtime",
        }
    }

    fn batch(&mut self, calls: usize) -> Vec<Duration> {
        let client = self.client.clone();
        match self.flavor {
            Flavor::CurrentThread => self.runtime.block_on(client_batch(client, calls)),
            Flavor::MultiThread => {
                let task = self.runtime.spawn(client_batch(client, calls));
                self.runtime
                    .block_on(task)
                    .expect("the benchmark task panicked")
            }
        }
    }
}

/// Python's `qemu.qmp`, one long-lived process that times its own calls.
struct PythonClient {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl PythonClient {
    fn connect(socket: &Path) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/qmp_python.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("failed to run python3 ({e}): install it with `apt-get install -y python3`")
            });
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self { child, stdout }
    }
}

impl Bench for PythonClient {
    fn label(&self) -> &'static str {
        "Python qemu.qmp 0.0.6"
    }

    fn batch(&mut self, calls: usize) -> Vec<Duration> {
        let stdin = self.child.stdin.as_mut().expect("piped stdin");
        writeln!(stdin, "{calls}").expect("send the batch size to qmp_python.py");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read the samples from qmp_python.py");
        let samples: Vec<Duration> = line
            .split_whitespace()
            .map(|nanos| Duration::from_nanos(nanos.parse().expect("a sample in nanoseconds")))
            .collect();
        assert_eq!(
            samples.len(),
            calls,
            "qmp_python.py failed (see its stderr above; install the library with \
             `pip install qemu.qmp==0.0.6`)"
        );
        samples
    }
}

impl Drop for PythonClient {
    fn drop(&mut self) {
        // Closing stdin ends the script's loop.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}
