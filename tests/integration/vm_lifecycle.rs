//! The VM controller against real QEMU (TCG, direct kernel boot of the test guests).

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nomad_driver_qemu::driver::vm::argv::{Drive, Piece};
use nomad_driver_qemu::driver::vm::{
    ExitReason, ForceStep, ProcessStatus, SavedVm, Vm, VmError, VmEvent, VmSpec, VmState,
    DEFAULT_REATTACH_TIMEOUT, STOP_MARGIN,
};
use rustix::process::{Pid, Signal};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::{self, Guest, POWERBUTTON_MARKER, READY_MARKER};

/// Generous bound for a TCG guest to print its ready marker (about 2.3 s when idle).
const BOOT_LIMIT: Duration = Duration::from_secs(60);

const STOP_TIMEOUT: Duration = Duration::from_secs(20);

fn send_signal(pid: u32, signal: Signal) {
    let target = Pid::from_raw(pid as i32).expect("non-zero pid");
    rustix::process::kill_process(target, signal).expect("send signal to QEMU");
}

async fn boot(name: &str, guest: Guest, dir: &Path) -> Vm {
    let spec = support::guest_spec(name, guest, dir);
    let vm = Vm::start(spec).await.expect("start VM");
    support::wait_for_marker(&dir.join("console.log"), READY_MARKER, BOOT_LIMIT).await;
    vm
}

#[tokio::test]
async fn lifecycle_graceful_stop() {
    let _slot = support::guest_slot().await;
    let dir = support::temp_dir();
    let name = support::unique_name("graceful");
    let work_dir = dir.path().join("work");
    std::fs::create_dir(&work_dir).expect("create the working dir");
    let spec = support::guest_spec(&name, Guest::Poweroff, dir.path());
    let vm = Vm::start(VmSpec {
        work_dir: work_dir.clone(),
        ..spec
    })
    .await
    .expect("start VM");
    support::wait_for_marker(&dir.path().join("console.log"), READY_MARKER, BOOT_LIMIT).await;
    assert_eq!(vm.state(), VmState::Running);
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", vm.pid())).expect("read QEMU's cwd");
    assert_eq!(cwd, work_dir);
    let mut events = vm.events();

    let started = Instant::now();
    let exit = vm.stop(STOP_TIMEOUT, libc::SIGTERM).await.expect("stop");
    let took = started.elapsed();

    assert_eq!(exit.reason, ExitReason::GuestPoweredOff);
    assert_eq!(exit.status, ProcessStatus::Exited(0));
    assert!(took < Duration::from_secs(5), "graceful stop took {took:?}");
    assert_eq!(vm.wait().await, exit);
    assert_eq!(vm.state(), VmState::Exited);
    assert!(support::contains_marker(
        &dir.path().join("console.log"),
        POWERBUTTON_MARKER
    ));
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    assert!(seen.contains(&VmEvent::PowerdownSent), "events: {seen:?}");
    assert!(seen.contains(&VmEvent::Exited(exit)), "events: {seen:?}");
    assert!(!dir.path().join("qmp.sock").exists());
    support::assert_no_qemu_named(&name);
}

#[tokio::test]
async fn lifecycle_ignoring_guest_forced() {
    let _slot = support::guest_slot().await;
    let dir = support::temp_dir();
    let name = support::unique_name("ignore");
    let vm = boot(&name, Guest::Ignore, dir.path()).await;
    let timeout = Duration::from_secs(3);

    let started = Instant::now();
    let exit = vm.stop(timeout, libc::SIGTERM).await.expect("stop");
    let took = started.elapsed();

    assert!(took >= timeout, "stop ended before the timeout: {took:?}");
    assert!(took <= timeout + STOP_MARGIN, "stop took {took:?}");
    assert_eq!(exit.reason, ExitReason::Forced(ForceStep::Quit));
    assert!(exit.reason.to_string().contains("forced"));
    support::assert_no_qemu_named(&name);
}

#[tokio::test]
async fn kill_during_graceful_stop() {
    let _slot = support::guest_slot().await;
    let dir = support::temp_dir();
    let name = support::unique_name("kill-during-stop");
    let vm = boot(&name, Guest::Ignore, dir.path()).await;

    let stopping = vm.clone();
    let graceful =
        tokio::spawn(async move { stopping.stop(Duration::from_secs(10), libc::SIGTERM).await });
    // Let the stop send system_powerdown and start waiting for the guest, which ignores it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(vm.state(), VmState::Stopping);

    let started = Instant::now();
    let killed = vm.kill().await.expect("kill during a stop");
    let took = started.elapsed();
    let stopped = tokio::time::timeout(Duration::from_secs(2), graceful)
        .await
        .expect("the graceful stop returns right after the kill")
        .expect("stop task joins")
        .expect("graceful stop");

    assert!(took < Duration::from_secs(2), "kill took {took:?}");
    assert_eq!(killed, stopped);
    assert_eq!(killed.reason, ExitReason::Forced(ForceStep::Quit));
    support::assert_no_qemu_named(&name);
}

#[tokio::test]
async fn huge_stop_timeout_powers_off() {
    let _slot = support::guest_slot().await;
    let dir = support::temp_dir();
    let name = support::unique_name("huge-timeout");
    let vm = boot(&name, Guest::Poweroff, dir.path()).await;

    let exit = tokio::time::timeout(STOP_TIMEOUT, vm.stop(Duration::MAX, libc::SIGTERM))
        .await
        .expect("the guest powers off long before the limit")
        .expect("stop");

    assert_eq!(exit.reason, ExitReason::GuestPoweredOff);
    support::assert_no_qemu_named(&name);
}

#[tokio::test]
async fn lifecycle_sigkill_non_child() {
    let _slot = support::guest_slot().await;
    let dir = support::temp_dir();
    let name = support::unique_name("sigkill");

    // `sh` starts QEMU in the background and reaps it, so QEMU is not this process's child.
    let command = support::guest_command(Guest::Poweroff);
    let script = r#""$@" </dev/null >console.log 2>stderr.log & echo $!; wait"#;
    let mut shell = tokio::process::Command::new("sh")
        .current_dir(dir.path())
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(&command.emulator)
        .args(command.args())
        .args(["-name", &format!("guest={name}")])
        .args(["-qmp", "unix:qmp.sock,server=on,wait=off"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    let stdout = shell.stdout.take().expect("sh stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .await
        .expect("read QEMU pid");
    let pid: u32 = line.trim().parse().expect("QEMU pid");
    support::wait_for_marker(&dir.path().join("console.log"), READY_MARKER, BOOT_LIMIT).await;

    let start_time = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .expect("read QEMU stat")
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19).map(str::to_owned))
        .and_then(|field| field.parse().ok())
        .expect("QEMU start time");
    let saved = SavedVm {
        name: name.clone(),
        pid,
        start_time,
        dir: dir.path().to_path_buf(),
    };
    let vm = Vm::reattach(&saved, DEFAULT_REATTACH_TIMEOUT)
        .await
        .expect("reattach");
    assert_eq!(vm.pid(), pid);

    send_signal(pid, Signal::KILL);
    let exit = tokio::time::timeout(Duration::from_secs(10), vm.wait())
        .await
        .expect("exit detected");

    assert_eq!(exit.reason, ExitReason::Killed(libc::SIGKILL));
    assert_eq!(exit.status, ProcessStatus::Signaled(libc::SIGKILL));
    assert_eq!(exit.status.code(), None);
    shell.wait().await.expect("wait sh");
    support::assert_no_qemu_named(&name);
}

#[tokio::test]
async fn start_missing_image_fails() {
    let dir = support::temp_dir();
    let name = support::unique_name("missing");
    let missing = dir.path().join("no-such-image.qcow2");
    let mut spec = support::guest_spec(&name, Guest::Poweroff, dir.path());
    spec.command = spec.command.with(Piece::Drive(Drive::new(&missing, "ide")));

    let error = Vm::start(spec).await.unwrap_err();

    let VmError::ExitedDuringStart {
        status,
        stderr_tail,
    } = &error
    else {
        panic!("expected ExitedDuringStart, got {error:?}");
    };
    assert_eq!(*status, ProcessStatus::Exited(1));
    assert!(
        stderr_tail.contains("no-such-image.qcow2"),
        "stderr tail lacks the image: {stderr_tail}"
    );
    assert!(error.to_string().contains("No such file"), "{error}");
    assert!(!dir.path().join("qmp.sock").exists());
    support::assert_no_qemu_named(&name);
}

#[tokio::test]
async fn lifecycle_long_run_dir() {
    let _slot = support::guest_slot().await;
    let base = support::temp_dir();
    let dir = base.path().join("a".repeat(110)).join("b".repeat(100));
    std::fs::create_dir_all(&dir).expect("create long dir");
    assert!(dir.as_os_str().len() > 200);
    let name = support::unique_name("longdir");

    let vm = boot(&name, Guest::Poweroff, &dir).await;
    let stats = vm.stats(Duration::from_secs(2)).await;
    assert!(!stats.is_stale(), "stale: {:?}", stats.stale);
    let exit = vm.stop(STOP_TIMEOUT, libc::SIGTERM).await.expect("stop");

    assert_eq!(exit.reason, ExitReason::GuestPoweredOff);
    assert!(!dir.join("qmp.sock").exists());
    support::assert_no_qemu_named(&name);
}

#[tokio::test]
async fn reattach_then_graceful_stop() {
    let _slot = support::guest_slot().await;
    let dir = support::temp_dir();
    let name = support::unique_name("reattach");
    let vm = boot(&name, Guest::Poweroff, dir.path()).await;
    let saved = vm.saved();
    let json = serde_json::to_string(&saved).expect("serialize saved VM");
    drop(vm);

    let restored: SavedVm = serde_json::from_str(&json).expect("parse saved VM");
    let vm = Vm::reattach(&restored, DEFAULT_REATTACH_TIMEOUT)
        .await
        .expect("reattach");
    assert_eq!(vm.pid(), saved.pid);
    assert_eq!(vm.state(), VmState::Running);
    let exit = vm.stop(STOP_TIMEOUT, libc::SIGTERM).await.expect("stop");

    assert_eq!(exit.reason, ExitReason::GuestPoweredOff);
    support::assert_no_qemu_named(&name);
}

#[tokio::test]
async fn reattach_rejects_reused_pid() {
    let dir = support::temp_dir();
    let saved = SavedVm {
        name: "not-qemu".into(),
        pid: std::process::id(),
        start_time: 1,
        dir: dir.path().to_path_buf(),
    };

    let error = Vm::reattach(&saved, DEFAULT_REATTACH_TIMEOUT)
        .await
        .unwrap_err();

    assert!(
        matches!(error, VmError::ProcessMismatch { pid, .. } if pid == saved.pid),
        "{error:?}"
    );
}

#[tokio::test]
async fn stats_stale_when_stopped() {
    let _slot = support::guest_slot().await;
    let dir = support::temp_dir();
    let name = support::unique_name("sigstop");
    let vm = boot(&name, Guest::Poweroff, dir.path()).await;
    let fresh = vm.stats(Duration::from_secs(2)).await;
    let guest = fresh.guest.as_ref().expect("guest stats");
    assert_eq!(guest.vcpus.len(), 1);
    assert!(fresh.host.expect("host stats").rss_bytes > 0);

    send_signal(vm.pid(), Signal::STOP);
    let deadline = Duration::from_millis(500);
    let started = Instant::now();
    let stale = vm.stats(deadline).await;
    let took = started.elapsed();

    assert!(stale.is_stale());
    assert!(stale.host.is_some());
    assert!(
        took < deadline + Duration::from_millis(500),
        "stats took {took:?}"
    );

    let timeout = Duration::from_secs(2);
    let started = Instant::now();
    let exit = vm.stop(timeout, libc::SIGTERM).await.expect("stop");
    let took = started.elapsed();
    assert!(took <= timeout + STOP_MARGIN, "stop took {took:?}");
    assert!(
        matches!(exit.reason, ExitReason::Forced(_)),
        "reason: {}",
        exit.reason
    );
    support::assert_no_qemu_named(&name);
}

#[tokio::test]
async fn run_subcommand_end_to_end() {
    let _slot = support::guest_slot().await;
    let dir = support::temp_dir();
    let name = support::unique_name("run-cli");
    let binary = env!("CARGO_BIN_EXE_nomad-driver-qemu");
    let mut run = tokio::process::Command::new(binary)
        .arg("run")
        .arg("--kernel")
        .arg(support::guest_file("vmlinuz"))
        .arg("--initrd")
        .arg(support::guest_file("initramfs.cpio.gz"))
        .args(["--append", "console=ttyS0 quiet panic=-1"])
        .args([
            "--memory",
            "128",
            "--args=-no-reboot",
            "--args=-nic",
            "--args=none",
        ])
        .args([
            "--name",
            &name,
            "--shutdown-timeout",
            "20",
            "--stats-interval",
            "1",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn run");
    let mut lines = BufReader::new(run.stdout.take().expect("run stdout")).lines();
    let mut output = Vec::new();
    let boot = async {
        while let Some(line) = lines.next_line().await.expect("read run output") {
            let ready = line.contains(READY_MARKER);
            output.push(line);
            if ready {
                return;
            }
        }
    };
    tokio::time::timeout(BOOT_LIMIT, boot)
        .await
        .expect("ready line within the boot limit");

    // The controller has the VM's only QMP connection, so a second client times out.
    let qmp = tokio::process::Command::new(binary)
        .arg("qmp")
        .arg("--socket")
        .arg(dir.path().join("qmp.sock"))
        .args(["--timeout", "1", "query-status"])
        .output()
        .await
        .expect("run qmp");
    assert!(!qmp.status.success());
    let qmp_error = String::from_utf8_lossy(&qmp.stderr);
    assert!(
        qmp_error.contains("one QMP client at a time"),
        "{qmp_error}"
    );

    // The operators' socket is free, so the same command gets its reply there.
    let qmp = tokio::process::Command::new(binary)
        .arg("qmp")
        .arg("--socket")
        .arg(dir.path().join("qmp-operator.sock"))
        .args(["--timeout", "5", "query-status"])
        .output()
        .await
        .expect("run qmp");
    let reply = String::from_utf8_lossy(&qmp.stdout);
    assert!(
        qmp.status.success(),
        "qmp failed: {}",
        String::from_utf8_lossy(&qmp.stderr)
    );
    assert!(reply.contains("\"running\""), "{reply}");

    // SIGHUP, as when the operator's terminal closes, stops the VM like SIGTERM does.
    let pid = run.id().expect("run pid");
    send_signal(pid, Signal::HUP);
    let rest = async {
        while let Some(line) = lines.next_line().await.expect("read run output") {
            output.push(line);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), rest)
        .await
        .expect("run ends after SIGHUP");
    let status = run.wait().await.expect("wait run");

    let text = output.join("\n");
    assert!(status.success(), "run failed: {status}\n{text}");
    assert!(text.contains("stats: cpu user"), "{text}");
    assert!(text.contains("stopping (received SIGHUP)"), "{text}");
    assert!(text.contains("event: system_powerdown sent"), "{text}");
    assert!(text.contains(POWERBUTTON_MARKER), "{text}");
    assert!(
        text.contains("exited: guest powered off (exit code 0)"),
        "{text}"
    );
    support::assert_no_qemu_named(&name);
}

#[tokio::test]
async fn run_rejects_out_of_range() {
    let binary = env!("CARGO_BIN_EXE_nomad-driver-qemu");
    let cases = [
        ("--shutdown-timeout", "18446744073709551615"),
        ("--stats-interval", "18446744073709551615"),
        ("--start-timeout", "0"),
        ("--memory", "0"),
        ("--memory", "18446744073709551615"),
    ];
    for (option, value) in cases {
        let output = tokio::process::Command::new(binary)
            .args(["run", "--kernel", "/nonexistent", option, value])
            .output()
            .await
            .expect("run the binary");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{option} {value}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid value '{value}' for '{option}")),
            "{option} {value}: {stderr}"
        );
    }
}
