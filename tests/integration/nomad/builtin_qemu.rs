//! Runs the test guests with Nomad's built-in `qemu` driver, as the baseline this crate's
//! driver replaces. The test prints how long `nomad job stop` takes for each guest.
//!
//! In Nomad v1.6.5 the built-in driver's default accelerator is `tcg`, and it only accepts an
//! `image_path` inside the alloc dir or under one of the plugin's `image_paths`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::agent::{is_alloc_stopped, AgentOptions, NomadAgent};

const TASK: &str = "vm";
const READY_MARKER: &str = "QEMU-GUEST-READY";
const KILL_TIMEOUT_SECS: u64 = 5;

fn fixture_guest(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("guest")
        .join(name);
    assert!(
        path.is_file(),
        "test guest {} is missing; build it with fixtures/build-guests.sh",
        path.display()
    );
    path
}

fn job_hcl(job: &str, image: &Path) -> String {
    format!(
        r#"
job "{job}" {{
  datacenters = ["*"]

  group "g" {{
    restart {{
      attempts = 0
      mode     = "fail"
    }}

    task "{TASK}" {{
      driver       = "qemu"
      kill_timeout = "{KILL_TIMEOUT_SECS}s"

      config {{
        image_path        = "{image}"
        accelerator       = "tcg"
        graceful_shutdown = true
      }}

      resources {{
        cpu    = 500
        memory = 128
      }}
    }}
  }}
}}
"#,
        image = image.display()
    )
}

/// Boots `guest` under the built-in driver, waits for its ready line, stops the job and
/// returns how long the stop took.
async fn boot_and_stop(agent: &NomadAgent, images: &Path, guest: &str) -> Duration {
    // A private copy: QEMU locks its disk image, and other tests may boot the fixture.
    let image = images.join(guest);
    std::fs::copy(fixture_guest(guest), &image).expect("copying the guest image");

    let job_id = agent
        .run_job(&job_hcl(
            &format!("builtin-{}", guest.replace('.', "-")),
            &image,
        ))
        .await;
    let alloc = agent
        .wait_task_state(&job_id, TASK, "running", Duration::from_secs(60))
        .await;
    let alloc_id = alloc["ID"]
        .as_str()
        .expect("allocation has an ID")
        .to_string();
    agent
        .wait_log_contains(&alloc_id, TASK, READY_MARKER, Duration::from_secs(60))
        .await;
    assert_eq!(agent.qemu_processes().len(), 1, "expected one QEMU process");

    let timeout = Duration::from_secs(KILL_TIMEOUT_SECS + 30);
    let (stopped, elapsed) = agent.stop_job(&job_id, timeout).await;
    assert!(is_alloc_stopped(&stopped));
    assert!(
        agent.qemu_processes().is_empty(),
        "QEMU still runs after the job stopped"
    );
    let log = agent.alloc_logs(&alloc_id, TASK, false).await;
    let events = agent.task_events(&alloc_id, TASK).await;
    println!(
        "built-in qemu driver, {guest}: nomad job stop to dead task took {elapsed:?}, \
         guest saw the power button: {}, events: {events:?}",
        log.contains("QEMU-GUEST-POWERBUTTON")
    );
    elapsed
}

#[tokio::test(flavor = "multi_thread")]
async fn builtin_qemu_boots_and_stops() {
    let images_dir = tempfile::Builder::new()
        .prefix("builtin-qemu-images-")
        .tempdir()
        .expect("creating the image directory");
    let images = images_dir.path();
    let options = AgentOptions {
        builtin_qemu_config: Some(format!(
            "    image_paths = [{:?}]",
            images.to_string_lossy()
        )),
        wait_for_drivers: vec!["qemu".to_string()],
        ..AgentOptions::default()
    };
    let agent = NomadAgent::start(options).await;
    let driver = agent
        .driver_info("qemu")
        .await
        .expect("the node lists the qemu driver");
    println!(
        "built-in qemu driver: QEMU {}",
        driver["Attributes"]["driver.qemu.version"]
    );

    // One guest at a time: each TCG guest keeps a host core busy while it boots.
    let bound = Duration::from_secs(KILL_TIMEOUT_SECS + 2);
    let poweroff = boot_and_stop(&agent, images, "guest.qcow2").await;
    assert!(
        poweroff < bound,
        "stop took {poweroff:?}, more than {bound:?}"
    );
    let ignore = boot_and_stop(&agent, images, "guest-ignore.qcow2").await;
    assert!(ignore < bound, "stop took {ignore:?}, more than {bound:?}");

    agent.shutdown().await;
}
