//! A VM outlives its plugin process and its Nomad client agent: after either one is gone and
//! back, the task still runs on the same QEMU process and a later stop is still graceful.

use std::time::{Duration, Instant};

use rustix::process::Signal;

use super::agent::NomadAgent;
use super::process;
use super::qemu_common::{
    events_text, image_paths_config, is_running, plugin_log_lines, plugin_options, run_vm,
    stop_gracefully, ImageDir, RunningVm, VmJob, RECOVER_TIMEOUT,
};
use crate::support;

const TASK: &str = "vm";

/// Bound on a graceful stop after the recovery, as `GRACEFUL_STOP_BOUND` in the lifecycle
/// tests.
const GRACEFUL_STOP_BOUND: Duration = Duration::from_secs(10);

/// Polls until exactly one process of this crate's plugin runs and returns its pid. Nomad
/// also starts a short-lived instance to read the plugin's info, so two can run for a moment.
async fn wait_single_plugin(agent: &NomadAgent, except: Option<i32>) -> i32 {
    let deadline = Instant::now() + RECOVER_TIMEOUT;
    loop {
        let pids: Vec<i32> = agent
            .plugin_processes()
            .into_iter()
            .map(|process| process.pid)
            .filter(|&pid| is_running(pid) && Some(pid) != except)
            .collect();
        if let [pid] = pids[..] {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "expected one plugin process (other than {except:?}) within {RECOVER_TIMEOUT:?}, \
             found {pids:?}\nagent log tail:\n{}",
            agent.log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Checks that the task runs on the same allocation and QEMU process as before and was not
/// restarted.
async fn assert_task_kept(agent: &NomadAgent, images: &ImageDir, vm: &RunningVm, cause: &str) {
    let alloc = agent
        .wait_task_state(&vm.job_id, TASK, "running", RECOVER_TIMEOUT)
        .await;
    assert_eq!(
        alloc["ID"].as_str(),
        Some(vm.alloc_id.as_str()),
        "a new allocation replaced the VM's after {cause}"
    );

    // The task runner calls RecoverTask on the new plugin instance; give it time to fail.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = agent.task_events(&vm.alloc_id, TASK).await;
    let text = events_text(&events);
    let restarted = events
        .iter()
        .any(|(kind, _)| matches!(kind.as_str(), "Restarting" | "Terminated" | "Killed"));
    assert!(
        !restarted,
        "the task ended or restarted after {cause} instead of being recovered; events:\n{text}\n\
         plugin log:\n{}",
        plugin_log_lines(agent, 60)
    );
    let starts = events.iter().filter(|(kind, _)| kind == "Started").count();
    assert_eq!(
        starts, 1,
        "the task was started again after {cause} instead of being recovered; events:\n{text}"
    );
    let alloc = agent.alloc_status(&vm.alloc_id).await;
    assert_eq!(
        alloc["TaskStates"][TASK]["State"].as_str(),
        Some("running"),
        "the task is not running after {cause}; events:\n{text}"
    );

    assert!(
        is_running(vm.qemu_pid),
        "QEMU pid {} died after {cause}; plugin log:\n{}",
        vm.qemu_pid,
        plugin_log_lines(agent, 60)
    );
    assert_eq!(
        images.qemu_pids(),
        vec![vm.qemu_pid],
        "the QEMU processes changed after {cause}"
    );
}

/// What happens to the plugin or the agent while the VM runs.
#[derive(Debug, Clone, Copy)]
enum Disruption {
    /// SIGKILL of the plugin process: Nomad launches a new one and recovers the task.
    PluginKill,
    /// A graceful agent restart (SIGINT), which also ends the plugin.
    AgentRestart,
    /// SIGKILL of the agent alone: the new agent reattaches to the surviving plugin.
    AgentCrash,
}

impl Disruption {
    fn name(self) -> &'static str {
        match self {
            Disruption::PluginKill => "plugin-kill",
            Disruption::AgentRestart => "agent-restart",
            Disruption::AgentCrash => "agent-crash",
        }
    }

    fn cause(self) -> &'static str {
        match self {
            Disruption::PluginKill => "the plugin was killed",
            Disruption::AgentRestart => "the agent restarted",
            Disruption::AgentCrash => "the agent crashed",
        }
    }

    /// Applies the disruption and checks which plugin process serves the task afterwards.
    async fn apply(self, agent: &mut NomadAgent) {
        let plugin = wait_single_plugin(agent, None).await;
        let begun = Instant::now();
        match self {
            Disruption::PluginKill => {
                process::signal_process(plugin, Signal::KILL);
                let relaunched = wait_single_plugin(agent, Some(plugin)).await;
                println!(
                    "plugin {plugin} killed, {relaunched} up after {:?}",
                    begun.elapsed()
                );
            }
            Disruption::AgentRestart => {
                let agent_pid = agent.pid().expect("the agent runs");
                agent.restart().await;
                println!("agent restarted in {:?}", begun.elapsed());
                assert_ne!(agent.pid(), Some(agent_pid), "the agent was not restarted");
            }
            Disruption::AgentCrash => {
                agent.crash_and_restart().await;
                println!("agent back after {:?}", begun.elapsed());
                // Nomad stores the plugin's address and dials it again after a crash, so the
                // same plugin process keeps serving the task.
                assert_eq!(
                    wait_single_plugin(agent, None).await,
                    plugin,
                    "the agent launched a new plugin instead of reattaching to the surviving one"
                );
            }
        }
    }
}

/// Runs a VM, applies `disruption`, checks that the task kept its QEMU process, and stops the
/// VM gracefully.
async fn survive(disruption: Disruption) {
    let name = disruption.name();
    let images = ImageDir::new();
    let image = images.copy_guest("guest.qcow2", &format!("{name}.qcow2"));
    let mut agent = NomadAgent::start(plugin_options(image_paths_config(images.path()))).await;
    let started = Instant::now();
    let _slot = support::guest_slot().await;

    let vm = run_vm(
        &agent,
        &images,
        &VmJob::new(&format!("qemu-{name}"), TASK, &image),
    )
    .await;
    disruption.apply(&mut agent).await;
    assert_task_kept(&agent, &images, &vm, disruption.cause()).await;

    let stop = stop_gracefully(&agent, &images, &vm, TASK, GRACEFUL_STOP_BOUND).await;
    println!(
        "{name}: graceful stop {stop:?}, time after agent start {:?}",
        started.elapsed()
    );

    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_vm_survives_plugin_kill() {
    survive(Disruption::PluginKill).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_vm_survives_agent_restart() {
    survive(Disruption::AgentRestart).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn qemu_vm_survives_agent_crash() {
    survive(Disruption::AgentCrash).await;
}
