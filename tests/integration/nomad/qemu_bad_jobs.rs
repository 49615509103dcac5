//! Jobs whose task config breaks a rule of this crate's driver fail with a message that names
//! the value and the fix, and start no QEMU. One agent runs the whole table.

use std::time::{Duration, Instant};

use super::agent::{is_alloc_stopped, task_events_of, NomadAgent};
use super::qemu_common::{
    events_text, image_paths_config, plugin_log_lines, plugin_options, wait_no_qemu, ImageDir,
    VmJob,
};
use crate::support;

const TASK: &str = "vm";

/// Time for a rejected task to be marked failed.
const FAIL_TIMEOUT: Duration = Duration::from_secs(60);

/// One job that must fail, and the texts its failure message must contain: the value at
/// fault and the fix.
struct BadJob {
    name: &'static str,
    job: VmJob,
    expected: Vec<String>,
}

/// Builds the table of bad jobs. `images` is allowed by the plugin's `image_paths`, `outside`
/// is not.
fn bad_jobs(images: &ImageDir, outside: &ImageDir) -> Vec<BadJob> {
    let allowed_image = images.copy_guest("guest.qcow2", "allowed.qcow2");
    let outside_image = outside.copy_guest("guest.qcow2", "outside.qcow2");
    let escaping_link = images.path().join("escaping-link.qcow2");
    std::os::unix::fs::symlink(&outside_image, &escaping_link)
        .expect("creating the escaping symlink");
    let comma_image = images.copy_guest("guest.qcow2", "with,comma.qcow2");

    let job = |name: &str, image: &std::path::Path| VmJob::new(name, TASK, image);
    let outside_text = outside_image.to_string_lossy().into_owned();
    let link_text = escaping_link.to_string_lossy().into_owned();

    let mut table = vec![
        BadJob {
            name: "image outside image_paths",
            job: job("bad-image-outside", &outside_image),
            expected: vec![
                outside_text.clone(),
                "outside the allowed dirs".to_owned(),
                "image_paths".to_owned(),
            ],
        },
        BadJob {
            name: "symlink that leaves image_paths",
            job: job("bad-image-symlink", &escaping_link),
            expected: vec![
                link_text,
                outside_text,
                "outside the allowed dirs".to_owned(),
                "image_paths".to_owned(),
            ],
        },
        BadJob {
            name: "comma in image_path",
            job: job("bad-image-comma", &comma_image),
            expected: vec!["with,comma.qcow2".to_owned(), "comma".to_owned()],
        },
    ];

    let mut not_allowed = job("bad-arg-not-allowed", &allowed_image);
    not_allowed.config_lines = vec![r#"args = ["-snapshot"]"#.to_owned()];
    table.push(BadJob {
        name: "arg not in args_allowlist",
        job: not_allowed,
        expected: vec!["-snapshot".to_owned(), "args_allowlist".to_owned()],
    });

    let mut positional = job("bad-arg-positional", &allowed_image);
    positional.config_lines = vec![r#"args = ["-smp", "1", "extra.img"]"#.to_owned()];
    table.push(BadJob {
        name: "positional arg",
        job: positional,
        expected: vec!["extra.img".to_owned(), "follow its flag".to_owned()],
    });

    let mut unknown_label = job("bad-port-map-label", &allowed_image);
    unknown_label.group_blocks = vec![r#"network {
      port "ssh" {}
    }"#
    .to_owned()];
    unknown_label.config_lines = vec![
        "port_map {".to_owned(),
        "  web = 80".to_owned(),
        "}".to_owned(),
    ];
    table.push(BadJob {
        name: "unknown port_map label",
        job: unknown_label,
        expected: vec![
            "\"web\"".to_owned(),
            "\"ssh\"".to_owned(),
            "network block".to_owned(),
        ],
    });

    // Nomad itself accepts 10 MB and more.
    let mut small = job("bad-memory-small", &allowed_image);
    small.memory_mib = 12;
    table.push(BadJob {
        name: "memory below the minimum",
        job: small,
        expected: vec!["12 MiB".to_owned(), "resources.memory".to_owned()],
    });

    let mut huge_overhead = job("bad-memory-overhead", &allowed_image);
    huge_overhead.config_lines = vec!["memory_overhead = 100000000".to_owned()];
    table.push(BadJob {
        name: "memory beyond the host",
        job: huge_overhead,
        expected: vec!["100000000".to_owned(), "memory_overhead".to_owned()],
    });

    table
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_bad_jobs_rejected() {
    let images = ImageDir::new();
    let outside = ImageDir::new();
    let plugin_config = format!(
        "{}\n    args_allowlist = [\"-smp\", \"-device\"]",
        image_paths_config(images.path())
    );
    let agent = NomadAgent::start(plugin_options(plugin_config)).await;
    let started = Instant::now();
    // A broken check would boot the guest, so this test takes a guest slot too.
    let _slot = support::guest_slot().await;

    let mut failures = Vec::new();
    for case in bad_jobs(&images, &outside) {
        let case_started = Instant::now();
        match check_bad_job(&agent, &images, &outside, &case).await {
            Ok(message) => println!(
                "qemu_bad_jobs_rejected: {} failed in {:?}: {message}",
                case.name,
                case_started.elapsed()
            ),
            Err(problem) => failures.push(format!("{}: {problem}", case.name)),
        }
    }
    println!(
        "qemu_bad_jobs_rejected: time after agent start {:?}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of the bad jobs were not rejected as expected:\n{}\nplugin log:\n{}",
        failures.len(),
        failures.join("\n\n"),
        plugin_log_lines(&agent, 60)
    );

    agent.shutdown().await;
}

/// Runs one bad job and returns its failure message, or what went wrong. A case that boots
/// QEMU is a failure and its VM is stopped, so the next case starts clean.
async fn check_bad_job(
    agent: &NomadAgent,
    images: &ImageDir,
    outside: &ImageDir,
    case: &BadJob,
) -> Result<String, String> {
    let job_id = agent.run_job(&case.job.hcl()).await;
    let alloc = agent
        .wait_alloc(&job_id, "the task to fail or run", FAIL_TIMEOUT, |alloc| {
            is_alloc_stopped(alloc) || alloc["TaskStates"][TASK]["State"] == "running"
        })
        .await;
    let events = task_events_of(&alloc, TASK);
    let text = events_text(&events);

    let mut problems = Vec::new();
    if alloc["ClientStatus"] != "failed" {
        problems.push(format!(
            "the allocation is {} instead of failed",
            alloc["ClientStatus"]
        ));
        agent.stop_job(&job_id, Duration::from_secs(60)).await;
    }
    let failure = events
        .iter()
        .find(|(kind, _)| kind == "Driver Failure")
        .map(|(_, message)| message.clone());
    match &failure {
        None => problems.push("no \"Driver Failure\" task event".to_owned()),
        Some(message) => {
            for needle in &case.expected {
                if !message.contains(needle.as_str()) {
                    problems.push(format!("the failure message lacks {needle:?}"));
                }
            }
        }
    }

    let left: Vec<i32> = wait_no_qemu(images, Duration::from_secs(2))
        .await
        .into_iter()
        .chain(wait_no_qemu(outside, Duration::from_secs(2)).await)
        .collect();
    if !left.is_empty() {
        problems.push(format!("QEMU processes run: {left:?}"));
    }
    let agent_qemu = agent.qemu_processes();
    if !agent_qemu.is_empty() {
        problems.push(format!("the agent's QEMU processes run: {agent_qemu:?}"));
    }

    if problems.is_empty() {
        Ok(failure.unwrap_or_default())
    } else {
        Err(format!("{}; events:\n{text}", problems.join("; ")))
    }
}
