//! Start and graceful-stop latency of a real TCG guest (`fixtures/guest/`, direct kernel boot),
//! through the VM layer next to what QEMU itself takes:
//!
//! * spawn -> QMP ready: [`Vm::start`] (spawn, negotiation and the first `query-status`)
//!   against a raw spawn of the same command line with `-qmp unix:...`, polling `connect()`
//!   every millisecond, then reading the greeting and the `qmp_capabilities` reply;
//! * graceful stop -> exit: [`Vm::stop`] against `system_powerdown` written to a raw socket,
//!   timed until `waitpid` returns.
//!
//! Each run boots one raw guest and one [`Vm`] guest, one after the other, so at most one guest
//! runs at a time. Both wait for the guest's ready line on the serial console before the stop.
//!
//! Run with `cargo bench --bench vm_lifecycle` (or `scripts/bench.sh`). Needs
//! `qemu-system-x86_64` and the test guests (`fixtures/build-guests.sh`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nomad_driver_qemu::driver::vm::argv::{DirectKernel, Machine, Memory, Piece, QemuCommandLine};
use nomad_driver_qemu::driver::vm::{ExitReason, Vm, VmSpec, DEFAULT_START_TIMEOUT};

const RUNS: usize = 8;

/// Serial console line the test guest prints once its power button handler runs.
const READY_MARKER: &str = "QEMU-GUEST-READY";

/// Bound on a TCG boot to the ready line (about 2.3 s on an idle 2-core host).
const BOOT_LIMIT: Duration = Duration::from_secs(60);

/// The guest powers off within about 50 ms of the button press; this bound only catches a hang.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

fn main() {
    let command = guest_command();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build a tokio runtime");

    let mut rows = Rows::default();
    for run in 0..RUNS {
        let dir = tempfile::tempdir().expect("create a temporary run directory");
        let raw = raw_cycle(&command, dir.path());
        let dir = tempfile::tempdir().expect("create a temporary run directory");
        let name = format!("bench-{}-{run}", std::process::id());
        let task = runtime.spawn(vm_cycle(command.clone(), name, dir.path().to_owned()));
        let ours = runtime.block_on(task).expect("the benchmark task panicked");

        rows.raw_greeting.push(raw.greeting);
        rows.raw_negotiated.push(raw.negotiated);
        rows.vm_ready.push(ours.ready);
        rows.raw_stop.push(raw.stop);
        rows.vm_stop.push(ours.stop);
        rows.stop_overhead
            .push(ours.stop.as_secs_f64() * 1e3 - raw.stop.as_secs_f64() * 1e3);
    }

    println!(
        "TCG guest (fixtures/guest, -m 128, direct kernel boot), {RUNS} runs, one guest at a time"
    );
    println!("median [min - max] in ms\n");
    println!("| step | median [min - max] |");
    println!("|---|---|");
    print_row("raw: spawn -> greeting", &rows.raw_greeting);
    print_row("raw: spawn -> qmp_capabilities reply", &rows.raw_negotiated);
    print_row(
        "Vm::start: spawn -> ready (negotiated + query-status)",
        &rows.vm_ready,
    );
    print_row("raw: system_powerdown -> exit (waitpid)", &rows.raw_stop);
    print_row("Vm::stop: call -> VmExit returned", &rows.vm_stop);
    println!(
        "| Vm::stop minus raw, same run | {} |",
        spread(rows.stop_overhead.clone())
    );
}

#[derive(Default)]
struct Rows {
    raw_greeting: Vec<Duration>,
    raw_negotiated: Vec<Duration>,
    vm_ready: Vec<Duration>,
    raw_stop: Vec<Duration>,
    vm_stop: Vec<Duration>,
    stop_overhead: Vec<f64>,
}

fn print_row(label: &str, samples: &[Duration]) {
    let millis = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    println!("| {label} | {} |", spread(millis));
}

/// Formats the median of `values` with their minimum and maximum.
fn spread(mut values: Vec<f64>) -> String {
    values.sort_unstable_by(f64::total_cmp);
    let middle = values[values.len() / 2];
    let (low, high) = (values[0], values[values.len() - 1]);
    format!("{middle:.1} [{low:.1} - {high:.1}]")
}

fn guest_file(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/guest")
        .join(name);
    assert!(
        path.is_file(),
        "missing test guest {}: run fixtures/build-guests.sh",
        path.display()
    );
    path
}

/// The test guest that powers off on the ACPI power button: TCG, 128 MiB, no NIC.
fn guest_command() -> QemuCommandLine {
    QemuCommandLine::new("qemu-system-x86_64")
        .with(Machine {
            machine_type: "pc".into(),
            accelerator: "tcg".into(),
        })
        .with(Memory { mib: 128 })
        .with(Piece::NoGraphic)
        .with(Piece::NoReboot)
        .with(Piece::Extra(vec!["-nic".into(), "none".into()]))
        .with(DirectKernel {
            kernel: guest_file("vmlinuz"),
            initrd: Some(guest_file("initramfs.cpio.gz")),
            append: Some("console=ttyS0 quiet panic=-1".into()),
        })
}

/// Waits until the console log contains the ready line.
fn wait_until_ready(console: &Path) {
    let started = Instant::now();
    loop {
        let content = std::fs::read(console).unwrap_or_default();
        if String::from_utf8_lossy(&content).contains(READY_MARKER) {
            return;
        }
        assert!(
            started.elapsed() < BOOT_LIMIT,
            "the guest printed no {READY_MARKER:?} within {BOOT_LIMIT:?}; console:\n{}",
            String::from_utf8_lossy(&content)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills QEMU when dropped, so a failed run leaves nothing behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // After a successful `wait` the status is known and `kill` sends nothing.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct RawTimes {
    greeting: Duration,
    negotiated: Duration,
    stop: Duration,
}

/// Boots the guest with plain `std::process`, then powers it off over a raw socket.
fn raw_cycle(command: &QemuCommandLine, dir: &Path) -> RawTimes {
    let socket = dir.join("qmp.sock");
    let console = dir.join("console.log");
    let stdout = std::fs::File::create(&console).expect("create the console log");
    let stderr = std::fs::File::create(dir.join("stderr.log")).expect("create the stderr log");

    let started = Instant::now();
    let child = Command::new(&command.emulator)
        .args(command.args())
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("failed to run qemu-system-x86_64 ({e}): install it with `apt-get install -y qemu-system-x86`")
        });
    let mut child = KillOnDrop(child);
    let stream = loop {
        match StdUnixStream::connect(&socket) {
            Ok(stream) => break stream,
            Err(_) => {
                assert!(
                    started.elapsed() < BOOT_LIMIT,
                    "QEMU did not listen on {}",
                    socket.display()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    };
    let mut reader = BufReader::new(stream.try_clone().expect("clone the socket"));
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).expect("read the greeting");
    let greeting = started.elapsed();
    assert!(line.contains("\"QMP\""), "unexpected greeting: {line}");
    writer
        .write_all(br#"{"execute": "qmp_capabilities"}"#)
        .expect("send qmp_capabilities");
    line.clear();
    reader
        .read_line(&mut line)
        .expect("read the qmp_capabilities reply");
    let negotiated = started.elapsed();

    wait_until_ready(&console);
    let stop_started = Instant::now();
    writer
        .write_all(br#"{"execute": "system_powerdown"}"#)
        .expect("send system_powerdown");
    let status = child.0.wait().expect("wait for QEMU");
    let stop = stop_started.elapsed();
    assert!(
        status.success(),
        "QEMU exited with {status} after system_powerdown"
    );

    RawTimes {
        greeting,
        negotiated,
        stop,
    }
}

struct VmTimes {
    ready: Duration,
    stop: Duration,
}

/// Boots the guest with [`Vm::start`] and stops it with [`Vm::stop`].
async fn vm_cycle(command: QemuCommandLine, name: String, dir: PathBuf) -> VmTimes {
    let console = dir.join("console.log");
    let spec = VmSpec {
        name,
        command,
        dir: dir.clone(),
        work_dir: dir.clone(),
        stdout: console.clone(),
        stderr: dir.join("stderr.log"),
        user: None,
        netns: None,
        cgroups: Vec::new(),
        start_timeout: DEFAULT_START_TIMEOUT,
    };

    let started = Instant::now();
    let vm = Vm::start(spec).await.expect("start the VM");
    let ready = started.elapsed();

    tokio::task::spawn_blocking(move || wait_until_ready(&console))
        .await
        .expect("the ready wait panicked");
    let stop_started = Instant::now();
    let exit = vm
        .stop(STOP_TIMEOUT, libc::SIGTERM)
        .await
        .expect("stop the VM");
    let stop = stop_started.elapsed();
    assert_eq!(exit.reason, ExitReason::GuestPoweredOff, "{exit:?}");

    VmTimes { ready, stop }
}
