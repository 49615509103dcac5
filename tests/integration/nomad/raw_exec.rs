//! Checks the harness itself with Nomad's built-in `raw_exec` driver, which needs nothing
//! from this crate.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::agent::{is_alloc_stopped, AgentOptions, NomadAgent};
use super::process;

const TASK: &str = "shell";

/// Builds a job whose task prints a marker, then exits 0 on SIGINT. The marker is also in its command
/// line, so the test can find the task's process in `/proc`.
fn job_hcl(marker: &str) -> String {
    format!(
        r#"
job "harness-raw-exec" {{
  datacenters = ["*"]
  type        = "service"

  group "g" {{
    restart {{
      attempts = 0
      mode     = "fail"
    }}

    task "{TASK}" {{
      driver       = "raw_exec"
      kill_signal  = "SIGINT"
      kill_timeout = "5s"

      config {{
        command = "/bin/sh"
        args    = ["-c", "trap 'echo stopping-{marker}; exit 0' INT; echo ready-{marker}; while true; do sleep 0.1; done"]
      }}

      resources {{
        cpu    = 100
        memory = 32
      }}
    }}
  }}
}}
"#
    )
}

fn raw_exec_options() -> AgentOptions {
    AgentOptions {
        raw_exec: true,
        wait_for_drivers: vec!["raw_exec".to_string()],
        ..AgentOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_exec_job_lifecycle() {
    let agent = NomadAgent::start(raw_exec_options()).await;
    let marker = format!("lifecycle-{}", std::process::id());

    let job_id = agent.run_job(&job_hcl(&marker)).await;
    assert_eq!(job_id, "harness-raw-exec");

    let alloc = agent
        .wait_task_state(&job_id, TASK, "running", Duration::from_secs(60))
        .await;
    let alloc_id = alloc["ID"]
        .as_str()
        .expect("allocation has an ID")
        .to_string();

    let log = agent
        .wait_log_contains(
            &alloc_id,
            TASK,
            &format!("ready-{marker}"),
            Duration::from_secs(20),
        )
        .await;
    assert!(log.contains(&format!("ready-{marker}")));

    let events = agent.task_events(&alloc_id, TASK).await;
    assert!(
        events.iter().any(|(kind, _)| kind == "Started"),
        "no Started event in {events:?}"
    );

    // Allocation metrics are collected every second (telemetry collection_interval).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stats = agent.alloc_stats(&alloc_id).await;
    let rss = stats["Tasks"][TASK]["ResourceUsage"]["MemoryStats"]["RSS"].as_u64();
    assert!(
        rss.is_some_and(|rss| rss > 0),
        "no task RSS in stats: {stats}"
    );

    let (stopped, elapsed) = agent.stop_job(&job_id, Duration::from_secs(30)).await;
    println!("raw_exec: nomad job stop to dead task took {elapsed:?}");
    assert!(is_alloc_stopped(&stopped));
    assert!(
        elapsed < Duration::from_secs(5 + 2),
        "a task that exits on SIGINT took {elapsed:?} to stop (kill_timeout is 5 s)"
    );

    let log = agent.alloc_logs(&alloc_id, TASK, false).await;
    assert!(
        log.contains(&format!("stopping-{marker}")),
        "the task did not log its SIGINT handler: {log:?}"
    );

    agent.shutdown().await;
    assert!(process::processes_mentioning(&marker).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_exec_survives_agent_restart() {
    let mut agent = NomadAgent::start(raw_exec_options()).await;
    let marker = format!("restart-{}", std::process::id());

    let job_id = agent.run_job(&job_hcl(&marker)).await;
    let alloc = agent
        .wait_task_state(&job_id, TASK, "running", Duration::from_secs(60))
        .await;
    let alloc_id = alloc["ID"]
        .as_str()
        .expect("allocation has an ID")
        .to_string();

    let before: Vec<i32> = process::processes_mentioning(&format!("ready-{marker}"))
        .iter()
        .map(|p| p.pid)
        .collect();
    assert_eq!(
        before.len(),
        1,
        "expected one task process, found {before:?}"
    );

    let agent_pid = agent.pid().expect("the agent runs");
    agent.restart().await;
    assert_ne!(agent.pid(), Some(agent_pid), "the agent was not restarted");

    let after = agent
        .wait_task_state(&job_id, TASK, "running", Duration::from_secs(30))
        .await;
    assert_eq!(after["ID"].as_str(), Some(alloc_id.as_str()));
    assert!(
        process::is_alive(before[0]),
        "the task process died across the restart"
    );
    let restarts = agent.task_events(&alloc_id, TASK).await;
    assert!(
        !restarts.iter().any(|(kind, _)| kind == "Restarting"),
        "the task was restarted instead of recovered: {restarts:?}"
    );

    agent.shutdown().await;
    assert!(
        !process::is_alive(before[0]),
        "the task outlived the harness shutdown"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn harness_cleans_up_after_panic() {
    let marker = format!("panic-{}", std::process::id());
    let hcl = job_hcl(&marker);
    let agent_dir = Arc::new(Mutex::new(None::<PathBuf>));

    let seen_dir = Arc::clone(&agent_dir);
    let test = tokio::spawn(async move {
        let agent = NomadAgent::start(raw_exec_options()).await;
        *seen_dir.lock().expect("lock is not poisoned") = Some(agent.dir().to_path_buf());
        let job_id = agent.run_job(&hcl).await;
        agent
            .wait_task_state(&job_id, TASK, "running", Duration::from_secs(60))
            .await;
        panic!("deliberate panic while the task runs");
    });
    let outcome = test.await;
    assert!(outcome.is_err_and(|err| err.is_panic()));

    let dir = agent_dir
        .lock()
        .expect("lock is not poisoned")
        .clone()
        .expect("the agent started");
    let left = process::processes_mentioning(&dir.to_string_lossy());
    assert!(left.is_empty(), "processes outlived the panic: {left:#?}");
    assert!(process::processes_mentioning(&marker).is_empty());
    assert!(!dir.exists(), "{} was not removed", dir.display());
}
