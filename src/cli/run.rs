//! `nomad-driver-qemu run`: one VM in the foreground.
//!
//! Options are named like the Nomad task config of the `qemu` driver. QEMU's serial console
//! (stdout) and stderr go to files in the run directory. `run` prints the console file as it
//! grows, along with each state change, stop step and periodic stats sample. Control
//! characters in console lines and QMP error texts are escaped before printing.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::driver::vm::argv::{DirectKernel, Drive, Machine, Memory, Piece, QemuCommandLine};
use crate::driver::vm::{sys, Vm, VmEvent, VmSpec, VmStats, DEFAULT_START_TIMEOUT};

use super::escape_control;

/// Maximum wait for the last console lines after the VM exited.
const CONSOLE_DRAIN_WAIT: Duration = Duration::from_secs(1);

/// Interval at which `run` reads new console output.
const CONSOLE_POLL: Duration = Duration::from_millis(100);

/// Deadline of one stats sample.
const STATS_DEADLINE: Duration = Duration::from_secs(1);

/// Maximum of the options given in seconds: one day.
const MAX_SECONDS: u64 = 24 * 60 * 60;

/// Maximum guest RAM in MiB: 16 TiB.
const MAX_MEMORY_MIB: u64 = 16 * 1024 * 1024;

/// Options of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Disk image to boot, attached as `-drive file=PATH` with a probed format (Nomad's
    /// `image_path`). Either this or `--kernel` is required.
    #[arg(long)]
    pub image_path: Option<PathBuf>,

    /// Accelerator, `tcg` or `kvm`.
    #[arg(long, default_value = "tcg")]
    pub accelerator: String,

    /// QEMU machine type.
    #[arg(long, default_value = "pc")]
    pub machine_type: String,

    /// Guest RAM in MiB (1 to 16777216, which is 16 TiB).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=MAX_MEMORY_MIB))]
    pub memory: u64,

    /// Extra QEMU argument, appended as given. Repeat for several, e.g. `--args=-smp --args=2`.
    #[arg(long = "args", allow_hyphen_values = true)]
    pub args: Vec<String>,

    /// Kernel image for direct boot (`-kernel`).
    #[arg(long)]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk for direct boot (`-initrd`); needs `--kernel`.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line for direct boot (`-append`); needs `--kernel`.
    #[arg(long, requires = "kernel")]
    pub append: Option<String>,

    /// Seconds the guest gets to power off after Ctrl-C, SIGTERM, SIGHUP or SIGQUIT before it
    /// is forced off (0 to 86400).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=MAX_SECONDS))]
    pub shutdown_timeout: u64,

    /// Signal sent to QEMU when `quit` did not end it in time.
    #[arg(long, default_value = "SIGTERM")]
    pub kill_signal: String,

    /// Run directory for the QMP socket and the console and stderr logs. Default: a new
    /// directory `nomad-driver-qemu-run-<pid>` in the system temp directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,

    /// VM name (`-name guest=NAME`). Default: `run-<pid>`.
    #[arg(long)]
    pub name: Option<String>,

    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub emulator: PathBuf,

    /// Seconds between printed stats samples (0 to 86400); 0 prints none.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=MAX_SECONDS))]
    pub stats_interval: u64,

    /// Seconds QEMU gets to complete the QMP handshake after spawn (1 to 86400).
    #[arg(long, default_value_t = DEFAULT_START_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..=MAX_SECONDS))]
    pub start_timeout: u64,
}

/// Runs `run`: boots the VM, prints what happens, and stops it gracefully on Ctrl-C, SIGTERM,
/// SIGHUP or SIGQUIT.
pub fn main(args: RunArgs) -> anyhow::Result<()> {
    init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("failed to build the tokio runtime")?;
    runtime.block_on(run(args))
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A subscriber set earlier (in tests) wins; that is fine.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let signal_number = sys::parse_signal(&args.kill_signal).with_context(|| {
        format!(
            "invalid --kill-signal {:?}; use a name such as SIGTERM or a number",
            args.kill_signal
        )
    })?;
    let spec = build_spec(&args)?;
    let console = spec.stdout.clone();
    // Print only what this run adds to a console log that may hold earlier runs.
    let console_offset = std::fs::metadata(&console).map_or(0, |meta| meta.len());
    println!("run dir: {}", spec.dir.display());

    // Installed before the start, so that a signal during boot stops the VM gracefully rather
    // than ending this process and leaving QEMU running.
    let mut signals = StopSignals::install()?;
    let vm = Vm::start(spec).await.context("failed to start the VM")?;
    println!("state: {} (pid {})", vm.state(), vm.pid());
    let mut events = vm.events();
    let console_done = CancellationToken::new();
    let console_task = tokio::spawn(follow_console(
        console,
        console_offset,
        console_done.clone(),
    ));
    let exit = supervise(&vm, &args, signal_number, &mut events, &mut signals).await;
    // Print the console lines QEMU wrote just before it exited, such as the guest's power-off
    // message, before returning.
    console_done.cancel();
    if tokio::time::timeout(CONSOLE_DRAIN_WAIT, console_task)
        .await
        .is_err()
    {
        tracing::warn!("console output after exit not fully printed");
    }
    exit
}

/// The signals that make `run` stop the VM: SIGTERM, SIGINT (Ctrl-C), SIGHUP (the terminal
/// closed) and SIGQUIT (Ctrl-\\). Their default action would end `run` and leave QEMU running.
struct StopSignals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
    quit: Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        let handle = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("failed to handle {name}"))
        };
        Ok(StopSignals {
            terminate: handle(SignalKind::terminate(), "SIGTERM")?,
            interrupt: handle(SignalKind::interrupt(), "SIGINT")?,
            hangup: handle(SignalKind::hangup(), "SIGHUP")?,
            quit: handle(SignalKind::quit(), "SIGQUIT")?,
        })
    }

    /// Waits for the next of the signals and returns its name.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.hangup.recv() => "SIGHUP",
            _ = self.quit.recv() => "SIGQUIT",
        }
    }
}

/// Prints events and stats until the VM exits, or stops it gracefully on one of the
/// [`StopSignals`].
async fn supervise(
    vm: &Vm,
    args: &RunArgs,
    signal_number: i32,
    events: &mut tokio::sync::broadcast::Receiver<VmEvent>,
    signals: &mut StopSignals,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.shutdown_timeout);

    let mut stats_tick = (args.stats_interval > 0).then(|| {
        let period = Duration::from_secs(args.stats_interval);
        tokio::time::interval_at(
            crate::driver::vm::deadline_after(tokio::time::Instant::now(), period),
            period,
        )
    });

    let received = loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(VmEvent::Exited(exit)) => {
                    println!("exited: {exit}");
                    return Ok(());
                }
                Ok(event) => print_event(&event),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    println!("event: {missed} events missed");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break None,
            },
            name = signals.recv() => break Some(name),
            _ = async { stats_tick.as_mut().expect("guarded by the if").tick().await }, if stats_tick.is_some() => {
                print_stats(&vm.stats(STATS_DEADLINE).await);
            }
        }
    };

    let cause = received.map_or_else(
        || "event stream closed".to_owned(),
        |name| format!("received {name}"),
    );
    println!(
        "stopping ({cause}): graceful power-off, up to {}s",
        args.shutdown_timeout
    );
    let stopping = vm.stop(timeout, signal_number);
    tokio::pin!(stopping);
    let exit = loop {
        tokio::select! {
            result = &mut stopping => break result.context("failed to stop the VM")?,
            event = events.recv() => if let Ok(event) = event {
                if !matches!(event, VmEvent::Exited(_)) {
                    print_event(&event);
                }
            },
        }
    };
    println!("exited: {exit}");
    Ok(())
}

fn build_spec(args: &RunArgs) -> anyhow::Result<VmSpec> {
    if args.image_path.is_none() && args.kernel.is_none() {
        bail!("nothing to boot: pass --image-path or --kernel");
    }
    let pid = std::process::id();
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("nomad-driver-qemu-run-{pid}")),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("failed to create run dir {}", dir.display()))?;

    let mut command = QemuCommandLine::new(&args.emulator)
        .with(Machine {
            machine_type: args.machine_type.clone(),
            accelerator: args.accelerator.clone(),
        })
        .with(Memory { mib: args.memory })
        .with(Piece::NoGraphic);
    if let Some(image) = &args.image_path {
        command.push(Drive::new(image, "ide"));
    }
    if let Some(kernel) = &args.kernel {
        command.push(DirectKernel {
            kernel: kernel.clone(),
            initrd: args.initrd.clone(),
            append: args.append.clone(),
        });
    }
    if !args.args.is_empty() {
        command.push(Piece::Extra(args.args.iter().map(Into::into).collect()));
    }

    Ok(VmSpec {
        name: args.name.clone().unwrap_or_else(|| format!("run-{pid}")),
        command,
        stdout: dir.join("console.log"),
        stderr: dir.join("qemu-stderr.log"),
        work_dir: dir.clone(),
        dir,
        user: None,
        netns: None,
        cgroups: Vec::new(),
        start_timeout: Duration::from_secs(args.start_timeout),
    })
}

fn print_event(event: &VmEvent) {
    match event {
        VmEvent::StateChanged { from, to } => println!("state: {to} (was {from})"),
        VmEvent::PowerdownSent => println!("event: system_powerdown sent"),
        VmEvent::GuestPoweredOff => println!("event: guest powered off"),
        VmEvent::TimedOut { after } => println!("event: guest did not power off within {after:?}"),
        VmEvent::QuitSent => println!("event: quit sent"),
        VmEvent::SignalSent(signal) => println!("event: sent {}", sys::signal_name(*signal)),
        VmEvent::StepFailed { step, error } => {
            println!("event: {step} failed: {}", escape_control(error));
        }
        VmEvent::QmpClosed => println!("event: QMP connection closed"),
        VmEvent::GuestPanicked => println!("event: guest panicked"),
        VmEvent::Exited(exit) => println!("exited: {exit}"),
    }
}

fn print_stats(stats: &VmStats) {
    let mut line = String::from("stats:");
    if let Some(host) = &stats.host {
        line.push_str(&format!(
            " cpu user {:.2}s system {:.2}s, rss {} MiB",
            host.user_cpu.as_secs_f64(),
            host.system_cpu.as_secs_f64(),
            host.rss_bytes / (1024 * 1024)
        ));
    }
    if let Some(guest) = &stats.guest {
        line.push_str(&format!(", {} vCPU", guest.vcpus.len()));
        for block in &guest.block_devices {
            line.push_str(&format!(
                ", {} read {} B written {} B",
                block.device, block.read_bytes, block.write_bytes
            ));
        }
        if let Some(balloon) = guest.balloon_bytes {
            line.push_str(&format!(", balloon {} MiB", balloon / (1024 * 1024)));
        }
    }
    if let Some(reason) = &stats.stale {
        line.push_str(&format!(" (stale: {reason})"));
    }
    println!("{line}");
}

/// Prints what QEMU writes to the console file from `offset` on, prefixed per line, until
/// `done` is cancelled and the file is read to its end.
async fn follow_console(path: PathBuf, offset: u64, done: CancellationToken) {
    if let Err(error) = follow(&path, offset, &done).await {
        tracing::warn!(path = %path.display(), %error, "stopped following the console log");
    }
}

async fn follow(path: &Path, offset: u64, done: &CancellationToken) -> std::io::Result<()> {
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut pending = Vec::new();
    let mut buffer = vec![0u8; 8192];
    loop {
        let read = file.read(&mut buffer).await?;
        if read == 0 {
            if done.is_cancelled() {
                if !pending.is_empty() {
                    print_console_line(&pending);
                }
                return Ok(());
            }
            tokio::select! {
                () = tokio::time::sleep(CONSOLE_POLL) => {}
                () = done.cancelled() => {}
            }
            continue;
        }
        pending.extend_from_slice(&buffer[..read]);
        while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            print_console_line(&line);
        }
    }
}

/// Prints one console line with control characters escaped: the guest controls its bytes.
fn print_console_line(line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    println!("console: {}", escape_control(text.trim_end()));
}
