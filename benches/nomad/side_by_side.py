#!/usr/bin/env python3
"""Measure this driver (`qemu-qmp`) and Nomad's built-in `qemu` driver in one Nomad agent.

`scripts/bench-nomad.sh` starts the agent with both drivers and runs this script twice:

* `measure` submits the same job to each driver through the agent's HTTP API and writes the
  raw figures as JSON: helper processes and memory per VM at several VM counts, CPU of the
  driver side, and the timings of start, graceful stop, stop of a guest that ignores the power
  button, and QEMU killed from outside. Timing runs alternate between the drivers.
* `table` prints the comparison table (Markdown) from that JSON, the scale benchmark's JSON
  lines (`benches/nomad/scale.rs`) and the output of `benches/qmp_roundtrip.rs`.

Python 3 standard library only. Times come from Nomad's own task event timestamps where it
records them, and from this script's clock (the same host clock) for the moment it acts.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

READY_MARKER = b"QEMU-GUEST-READY"
POWERBUTTON_MARKER = b"QEMU-GUEST-POWERBUTTON"
DRIVERS = ("qemu-qmp", "qemu")
TASK = "vm"
# Interval of the HTTP polls that watch for a task state change.
POLL_INTERVAL = 0.005
# Upper bound for one guest to boot under TCG while others run.
BOOT_LIMIT = 180.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Bench:
    """The agent's HTTP API, its data dir and the guest images."""

    def __init__(self, args):
        self.addr = args.addr.rstrip("/")
        self.data_dir = args.data_dir
        self.image_dir = args.image_dir
        self.nomad = args.nomad
        self.job_serial = 0

    def api(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.addr + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def overlay(self, base, name):
        """Creates a qcow2 overlay of `base` so that every VM writes to its own file."""
        path = os.path.join(self.image_dir, name)
        if os.path.exists(path):
            os.remove(path)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, path],
            check=True,
        )
        return path

    def job(self, driver, image_path, count=1, kill_timeout_s=30):
        self.job_serial += 1
        job_id = f"bench-{driver}-{self.job_serial}"
        task = {
            "Name": TASK,
            "Driver": driver,
            "KillTimeout": int(kill_timeout_s * 1e9),
            "Config": {
                "image_path": image_path,
                "accelerator": "tcg",
                "graceful_shutdown": True,
            },
            "Resources": {"CPU": 20, "MemoryMB": 128},
        }
        group = {
            "Name": TASK,
            "Count": count,
            "RestartPolicy": {"Attempts": 0, "Mode": "fail", "Interval": int(60e9), "Delay": int(1e9)},
            "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
            "Tasks": [task],
        }
        return {"ID": job_id, "Name": job_id, "Type": "service", "Datacenters": ["*"], "TaskGroups": [group]}

    def register(self, job):
        self.api("POST", "/v1/jobs", {"Job": job})

    def stop(self, job_id):
        self.api("DELETE", f"/v1/job/{job_id}?purge=true")

    def allocs(self, job_id):
        return self.api("GET", f"/v1/job/{job_id}/allocations") or []

    def alloc(self, alloc_id):
        return self.api("GET", f"/v1/allocation/{alloc_id}")

    def console(self, alloc_id):
        path = os.path.join(self.data_dir, "alloc", alloc_id, "alloc", "logs", f"{TASK}.stdout.0")
        try:
            with open(path, "rb") as file:
                return file.read()
        except FileNotFoundError:
            return b""

    def wait_running(self, job_id, count, limit=BOOT_LIMIT):
        """Waits until `count` allocations have a running task whose guest printed its ready line."""
        deadline = time.monotonic() + limit
        while True:
            allocs = self.allocs(job_id)
            ready = [a["ID"] for a in allocs if task_state(a) == "running" and READY_MARKER in self.console(a["ID"])]
            failed = [a for a in allocs if task_state(a) == "dead"]
            if failed:
                raise RuntimeError(f"job {job_id}: a task died during start: {json.dumps(failed[0].get('TaskStates'))[:2000]}")
            if len(ready) >= count:
                return ready
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id}: {len(ready)} of {count} guests ready after {limit:.0f} s")
            time.sleep(0.2)

    def wait_dead(self, alloc_id, limit=120.0):
        """Polls until the task is dead and returns (alloc, the poll time it was first seen dead)."""
        deadline = time.monotonic() + limit
        while True:
            alloc = self.alloc(alloc_id)
            if task_state(alloc) == "dead":
                return alloc, time.time_ns()
            if time.monotonic() > deadline:
                raise RuntimeError(f"allocation {alloc_id}: task not dead after {limit:.0f} s")
            time.sleep(POLL_INTERVAL)

    def wait_gone(self, job_id):
        deadline = time.monotonic() + 120
        while any(task_state(a) not in ("dead", None) for a in self.allocs(job_id)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id}: tasks still running 120 s after the stop")
            time.sleep(0.2)


def task_state(alloc):
    return ((alloc.get("TaskStates") or {}).get(TASK) or {}).get("State")


def event_time(alloc, event_type):
    """Returns the time (ns) of the task's last event of `event_type`, or None."""
    events = ((alloc.get("TaskStates") or {}).get(TASK) or {}).get("Events") or []
    times = [e["Time"] for e in events if e.get("Type") == event_type]
    return times[-1] if times else None


def rfc3339_ns(text):
    """Parses Nomad's RFC 3339 time with nanoseconds, such as 2024-01-02T03:04:05.123456789Z."""
    import calendar

    date, _, rest = text.partition("T")
    clock = rest.rstrip("Z")
    whole, _, fraction = clock.partition(".")
    seconds = calendar.timegm(time.strptime(f"{date}T{whole}", "%Y-%m-%dT%H:%M:%S"))
    return seconds * 1_000_000_000 + int((fraction + "000000000")[:9])


def finished_at(alloc):
    return rfc3339_ns(alloc["TaskStates"][TASK]["FinishedAt"])


# --- processes ---------------------------------------------------------------------------


def processes():
    """Returns {pid: (ppid, argv, rss_kib, cpu_ticks)} for every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                argv = [part.decode(errors="replace") for part in file.read().split(b"\0") if part]
            with open(f"/proc/{entry}/status") as file:
                rss = next((int(line.split()[1]) for line in file if line.startswith("VmRSS:")), 0)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        table[int(entry)] = (int(fields[1]), argv, rss, int(fields[11]) + int(fields[12]))
    return table


def qemu_pids(table, image_prefix):
    """Returns the QEMU processes whose drive file starts with `image_prefix`."""
    return [
        pid
        for pid, (_, argv, _, _) in table.items()
        if argv and os.path.basename(argv[0]).startswith("qemu-system") and any(image_prefix in a for a in argv)
    ]


def find_qemu(image_path, limit=30.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        pids = qemu_pids(processes(), image_path)
        if pids:
            return pids[0]
        time.sleep(0.05)
    raise RuntimeError(f"no QEMU process with {image_path} on its command line")


def helper_processes(table, qemus, stop_at):
    """Returns the ancestors of `qemus` below the first process in `stop_at` (or pid 1)."""
    helpers = set()
    for pid in qemus:
        parent = table[pid][0]
        while parent > 1 and parent not in stop_at and parent in table:
            helpers.add(parent)
            parent = table[parent][0]
    return helpers


def watch_exit(pid, result):
    """Polls every millisecond until `pid` is gone or a zombie and stores the time (ns)."""
    while True:
        try:
            with open(f"/proc/{pid}/stat") as file:
                state = file.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            state = "gone"
        if state in ("Z", "X", "gone"):
            result.append(time.time_ns())
            return
        time.sleep(0.001)


# --- measurements ------------------------------------------------------------------------


def measure_scale(bench, driver, counts, cpu_window, agent_pid, plugin_pid, base):
    """Row 1 and row 6: helper processes, their RSS and the plugin's RSS at each VM count,
    then CPU of the driver side over `cpu_window` seconds at the largest count."""
    prefix = os.path.join(bench.image_dir, f"scale-{driver}-")
    for index in range(max(counts)):
        bench.overlay(base, f"scale-{driver}-{index}.qcow2")
    job = bench.job(driver, prefix + "${NOMAD_ALLOC_INDEX}.qcow2", count=0)
    figures = []
    running = 0
    for count in counts:
        # Boot at most two guests at a time: TCG guests slow each other down beyond that.
        while running < count:
            running = min(running + 2, count)
            job["TaskGroups"][0]["Count"] = running
            bench.register(job)
            bench.wait_running(job["ID"], running)
        table = processes()
        qemus = qemu_pids(table, prefix)
        helpers = helper_processes(table, qemus, {agent_pid, plugin_pid})
        logmons = [pid for pid, (_, argv, _, _) in table.items() if argv[1:2] == ["logmon"]]
        figure = {
            "vms": count,
            "qemu_processes": len(qemus),
            "helpers": len(helpers),
            "helper_rss_kib": [table[pid][2] for pid in helpers],
            "helper_names": sorted({" ".join([os.path.basename(table[pid][1][0])] + table[pid][1][1:2]) for pid in helpers}),
            "logmon_processes": len(logmons),
            "plugin_rss_kib": table[plugin_pid][2] if driver == "qemu-qmp" else None,
        }
        print(f"  {driver}: {count} VMs: {json.dumps(figure)}", file=sys.stderr)
        figures.append(figure)

    # CPU of the driver side: the plugin for this driver, the executors for the built-in.
    table = processes()
    side = [plugin_pid] if driver == "qemu-qmp" else sorted(helper_processes(table, qemu_pids(table, prefix), {agent_pid}))
    before = {pid: table[pid][3] for pid in side}
    agent_before = table[agent_pid][3]
    began = time.monotonic()
    time.sleep(cpu_window)
    elapsed = time.monotonic() - began
    table = processes()
    ticks = sum(table[pid][3] - before[pid] for pid in side if pid in table)
    cpu = {
        "vms": running,
        "window_s": elapsed,
        "processes": len(side),
        "cpu_s_per_vm_per_min": ticks / CLOCK_TICKS / running / (elapsed / 60),
        "agent_cpu_s_per_vm_per_min": (table[agent_pid][3] - agent_before) / CLOCK_TICKS / running / (elapsed / 60),
    }
    print(f"  {driver}: CPU {json.dumps(cpu)}", file=sys.stderr)
    bench.stop(job["ID"])
    bench.wait_gone(job["ID"])
    return {"counts": figures, "cpu": cpu}


def run_once(bench, driver, base, kind, serial):
    """One timing run: start a guest, wait until it is ready, then stop it or kill QEMU."""
    kill_timeout = 5 if kind == "ignore" else 30
    image = bench.overlay(base, f"run-{driver}-{serial}.qcow2")
    job = bench.job(driver, image, kill_timeout_s=kill_timeout)
    submitted = time.time_ns()
    bench.register(job)
    (alloc_id,) = bench.wait_running(job["ID"], 1)
    alloc = bench.alloc(alloc_id)
    result = {"start_ms": (event_time(alloc, "Started") - submitted) / 1e6}
    qemu = find_qemu(image)

    exited = []
    watcher = threading.Thread(target=watch_exit, args=(qemu, exited), daemon=True)
    watcher.start()
    acted = time.time_ns()
    if kind == "kill":
        os.kill(qemu, signal.SIGKILL)
    else:
        bench.stop(job["ID"])
    alloc, seen = bench.wait_dead(alloc_id)
    watcher.join(timeout=60)
    dead = finished_at(alloc)
    result["acted_to_dead_ms"] = (dead - acted) / 1e6
    result["acted_to_seen_ms"] = (seen - acted) / 1e6
    result["qemu_exit_ms"] = (exited[0] - acted) / 1e6 if exited else None
    result["exit_to_dead_ms"] = (dead - exited[0]) / 1e6 if exited else None
    result["powerbutton_seen"] = POWERBUTTON_MARKER in bench.console(alloc_id)
    if kind == "kill":
        bench.stop(job["ID"])
    bench.wait_gone(job["ID"])
    os.remove(image)
    return result


def find_pid(predicate):
    for pid, (_, argv, _, _) in processes().items():
        if predicate(argv):
            return pid
    raise RuntimeError("process not found")


def measure(args):
    bench = Bench(args)
    guests = {
        "poweroff": os.path.join(args.image_dir, "guest.qcow2"),
        "ignore": os.path.join(args.image_dir, "guest-ignore.qcow2"),
    }
    agent_pid = args.agent_pid
    plugin_pid = find_pid(lambda argv: bool(argv) and argv[0].endswith("/nomad-driver-qemu-qmp"))
    counts = [int(c) for c in args.counts.split(",")]
    results = {"scale": {}, "runs": {d: {"poweroff": [], "ignore": [], "kill": []} for d in DRIVERS}}

    for driver in DRIVERS:
        print(f"== memory and CPU at {counts} VMs: {driver}", file=sys.stderr)
        results["scale"][driver] = measure_scale(
            bench, driver, counts, args.cpu_window, agent_pid, plugin_pid, guests["poweroff"]
        )

    serial = 0
    for run in range(args.runs):
        for kind in ("poweroff", "ignore", "kill"):
            # Alternate which driver goes first, so drift hits both alike.
            order = DRIVERS if run % 2 == 0 else tuple(reversed(DRIVERS))
            for driver in order:
                serial += 1
                base = guests["ignore" if kind == "ignore" else "poweroff"]
                result = run_once(bench, driver, base, kind, serial)
                print(f"== run {run + 1}/{args.runs} {kind} {driver}: {json.dumps(result)}", file=sys.stderr)
                results["runs"][driver][kind].append(result)

    with open(args.out, "w") as file:
        json.dump(results, file, indent=1)


# --- table -------------------------------------------------------------------------------


def spread(values, unit=""):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{statistics.median(values):.1f}{unit} [{min(values):.1f} - {max(values):.1f}]"


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(ours, builtin):
    if ours is None or builtin in (None, 0):
        return "n/a"
    return f"{ours / builtin:.2f}"


def table(args):
    with open(args.nomad) as file:
        results = json.load(file)
    scale_lines = []
    if args.scale and os.path.exists(args.scale):
        with open(args.scale) as file:
            scale_lines = [json.loads(line) for line in file if line.startswith("{")]
    roundtrip = ""
    if args.roundtrip and os.path.exists(args.roundtrip):
        with open(args.roundtrip) as file:
            roundtrip = file.read()

    ours_scale = results["scale"]["qemu-qmp"]
    builtin_scale = results["scale"]["qemu"]
    rows = []

    for ours, builtin in zip(ours_scale["counts"], builtin_scale["counts"]):
        vms = ours["vms"]
        executor_rss = builtin["helper_rss_kib"]
        executor_median = statistics.median(executor_rss) if executor_rss else None
        rows.append((
            f"1. helper processes per VM at {vms} VMs",
            f"{ours['helpers'] / vms:.2f}",
            f"{builtin['helpers'] / builtin['vms']:.2f}",
            ratio(ours["helpers"], builtin["helpers"]),
        ))
        per_vm = ours["plugin_rss_kib"] / vms / 1024
        rows.append((
            f"1. driver-side RSS per VM at {vms} VMs (MiB; ours: plugin RSS / VMs; built-in: executor RSS, median [min - max])",
            f"{per_vm:.2f}",
            spread([r / 1024 for r in executor_rss]),
            ratio(per_vm, executor_median / 1024 if executor_median else None),
        ))

    runs = results["runs"]

    def row(label, kind, key):
        ours = [r[key] for r in runs["qemu-qmp"][kind]]
        builtin = [r[key] for r in runs["qemu"][kind]]
        rows.append((label, spread(ours), spread(builtin), ratio(median(ours), median(builtin))))

    start_ours = [r["start_ms"] for kind in ("poweroff", "ignore", "kill") for r in runs["qemu-qmp"][kind]]
    start_builtin = [r["start_ms"] for kind in ("poweroff", "ignore", "kill") for r in runs["qemu"][kind]]
    rows.append(("2. job submitted -> task running (ms)", spread(start_ours), spread(start_builtin), ratio(median(start_ours), median(start_builtin))))
    row("3. job stopped -> task dead, powering-off guest, kill_timeout 30s (ms)", "poweroff", "acted_to_dead_ms")
    row("3. QEMU exit -> task dead, same runs (ms)", "poweroff", "exit_to_dead_ms")
    row("4. job stopped -> task dead, guest ignores the button, kill_timeout 5s (ms)", "ignore", "acted_to_dead_ms")
    for result in runs["qemu-qmp"]["ignore"] + runs["qemu"]["ignore"]:
        result["over_kill_timeout_ms"] = result["acted_to_dead_ms"] - 5000
    row("4. the same minus kill_timeout (ms)", "ignore", "over_kill_timeout_ms")
    row("5. SIGKILL of QEMU -> task dead, Nomad's FinishedAt (ms)", "kill", "acted_to_dead_ms")
    row(f"5. SIGKILL of QEMU -> dead seen by polling the HTTP API every {POLL_INTERVAL * 1000:.0f} ms (ms)", "kill", "acted_to_seen_ms")
    cpu_ours = ours_scale["cpu"]
    cpu_builtin = builtin_scale["cpu"]
    rows.append((
        f"6. driver-side CPU per VM per minute at {cpu_ours['vms']} VMs, 1 s metrics (CPU s; ours: plugin; built-in: executors)",
        f"{cpu_ours['cpu_s_per_vm_per_min']:.3f}",
        f"{cpu_builtin['cpu_s_per_vm_per_min']:.3f}",
        ratio(cpu_ours["cpu_s_per_vm_per_min"], cpu_builtin["cpu_s_per_vm_per_min"]),
    ))
    rows.append((
        "6. Nomad agent CPU per VM per minute in the same windows (CPU s, for context)",
        f"{cpu_ours['agent_cpu_s_per_vm_per_min']:.3f}",
        f"{cpu_builtin['agent_cpu_s_per_vm_per_min']:.3f}",
        ratio(cpu_ours["agent_cpu_s_per_vm_per_min"], cpu_builtin["agent_cpu_s_per_vm_per_min"]),
    ))
    for line in scale_lines:
        rows.append((
            f"7. plugin alone, {line['tasks']} QMP doubles: RSS MiB / CPU % of one core",
            f"{line['plugin_rss_kib'] / 1024:.1f} / {line['plugin_cpu_percent']:.2f}",
            "n/a",
            "n/a",
        ))

    powerbutton = {
        driver: sum(r["powerbutton_seen"] for r in runs[driver]["poweroff"]) for driver in DRIVERS
    }
    total = len(runs["qemu"]["poweroff"])
    print("| row | qemu-qmp (this driver) | qemu (built-in) | ratio ours / built-in |")
    print("|---|---|---|---|")
    for label, ours, builtin, rate in rows:
        print(f"| {label} | {ours} | {builtin} | {rate} |")
    print()
    print(
        f"Guest printed its power-button line in the graceful stop runs: qemu-qmp "
        f"{powerbutton['qemu-qmp']} of {total}, qemu {powerbutton['qemu']} of {total}."
    )
    print(f"Helper processes seen: qemu-qmp {ours_scale['counts'][-1]['helper_names']}, qemu {builtin_scale['counts'][-1]['helper_names']}.")
    print(f"logmon processes at the largest count (Nomad's, one per task with either driver): qemu-qmp {ours_scale['counts'][-1]['logmon_processes']}, qemu {builtin_scale['counts'][-1]['logmon_processes']}.")
    if roundtrip:
        print()
        print("8. QMP round trip (benches/qmp_roundtrip.rs):")
        print()
        print(roundtrip.strip())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("measure", help="run the jobs and write raw figures as JSON")
    run.add_argument("--addr", required=True, help="agent HTTP address, such as http://127.0.0.1:4646")
    run.add_argument("--data-dir", required=True, help="the agent's data_dir")
    run.add_argument("--image-dir", required=True, help="dir in both drivers' image_paths with guest.qcow2 and guest-ignore.qcow2")
    run.add_argument("--nomad", required=True, help="nomad binary")
    run.add_argument("--agent-pid", required=True, type=int, help="pid of the Nomad agent")
    run.add_argument("--counts", default="1,10,20", help="VM counts of row 1, increasing")
    run.add_argument("--cpu-window", default=60.0, type=float, help="seconds of the CPU sample of row 6")
    run.add_argument("--runs", default=5, type=int, help="timing runs per driver and case")
    run.add_argument("--out", required=True, help="JSON file to write")
    report = commands.add_parser("table", help="print the comparison table")
    report.add_argument("--nomad", required=True, help="JSON written by measure")
    report.add_argument("--scale", help="JSON lines of benches/nomad/scale.rs")
    report.add_argument("--roundtrip", help="output of benches/qmp_roundtrip.rs")
    args = parser.parse_args()
    if args.command == "measure":
        measure(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
