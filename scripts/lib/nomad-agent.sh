# shellcheck shell=bash
# Functions for the scripts that run a throwaway Nomad agent (server and client on 127.0.0.1)
# in a temporary work dir: free ports, the agent config, start-up, readiness, stop and cleanup.
#
# Source it from a bash script that runs with `set -euo pipefail`. It defines functions only
# and reads no globals: every function takes what it needs as arguments. Errors go to stderr,
# prefixed with the calling script's file name, and the function returns 1.

# Prints three free TCP ports on 127.0.0.1 on one line, for the agent's http, rpc and serf
# ports. The sockets are bound at once, so the three ports differ, but another process may
# still take one before the agent binds it.
nomad_agent_free_ports() {
    python3 -c '
import socket
ports = []
sockets = []
while len(ports) < 3:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    sockets.append(s)
    ports.append(s.getsockname()[1])
print(*ports)
'
}

# Prints the agent config for work dir WORK (data in WORK/data, plugins in WORK/plugins) with
# the given ports and the client's gc_max_allocs (Nomad's default is 50). Append a plugin
# block per driver to it, see nomad_agent_plugin_block.
# Usage: nomad_agent_config WORK HTTP_PORT RPC_PORT SERF_PORT GC_MAX_ALLOCS
nomad_agent_config() {
    local work="$1" http_port="$2" rpc_port="$3" serf_port="$4" gc_max_allocs="$5"
    cat <<EOF
data_dir             = "$work/data"
plugin_dir           = "$work/plugins"
bind_addr            = "127.0.0.1"
log_level            = "INFO"
disable_update_check = true

advertise {
  http = "127.0.0.1"
  rpc  = "127.0.0.1"
  serf = "127.0.0.1"
}

ports {
  http = $http_port
  rpc  = $rpc_port
  serf = $serf_port
}

server {
  enabled          = true
  bootstrap_expect = 1
}

client {
  enabled           = true
  network_interface = "lo"
  gc_max_allocs     = $gc_max_allocs
  options {
    # The cloud fingerprinters query link-local metadata addresses; Consul's polls port 8500.
    "fingerprint.denylist" = "env_aws,env_gce,env_azure,env_digitalocean,consul"
  }
}

consul {
  auto_advertise   = false
  server_auto_join = false
  client_auto_join = false
}

telemetry {
  publish_allocation_metrics = true
  collection_interval        = "1s"
}
EOF
}

# Prints a `plugin` block that lets the driver NAME run images from IMAGE_DIR.
# Usage: nomad_agent_plugin_block NAME IMAGE_DIR
nomad_agent_plugin_block() {
    cat <<EOF
plugin "$1" {
  config {
    image_paths = ["$2"]
  }
}
EOF
}

# Waits up to 60 s until the agent's node is ready and every DRIVER on it is healthy. If the
# agent exits or the time runs out, prints the end of its log LOG and an error, and returns 1.
# Usage: nomad_agent_wait_ready NOMAD AGENT_PID LOG DRIVER...
nomad_agent_wait_ready() {
    local nomad="$1" agent_pid="$2" log="$3"
    shift 3
    local template='{{.Status}}' expected="ready" driver
    for driver in "$@"; do
        template+=" {{with index .Drivers \"$driver\"}}{{.Healthy}}{{end}}"
        expected+=" true"
    done
    local names=""
    for driver in "$@"; do
        names+="${names:+ and }$driver"
    done
    local drivers_text="healthy $names drivers"
    [[ $# -eq 1 ]] && drivers_text="a healthy $names driver"

    local state=""
    for _ in $(seq 1 300); do
        if ! kill -0 "$agent_pid" 2>/dev/null; then
            tail -n 40 "$log" >&2
            echo "${0##*/}: the Nomad agent exited during start-up" >&2
            return 1
        fi
        state="$("$nomad" node status -self -t "$template" 2>/dev/null || true)"
        [[ "$state" == "$expected" ]] && return 0
        sleep 0.2
    done
    tail -n 40 "$log" >&2
    echo "${0##*/}: the node was not ready with $drivers_text within 60 s (last state: '$state')" >&2
    return 1
}

# Sends SIGINT to the agent, Nomad's graceful shutdown, and waits up to 30 s for it to exit.
# Usage: nomad_agent_interrupt AGENT_PID
nomad_agent_interrupt() {
    kill -INT "$1" 2>/dev/null || true
    for _ in $(seq 1 300); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
}

# Stops a running agent as nomad_agent_interrupt does, then kills its process group (the agent
# runs in its own session). Does nothing if AGENT_PID is empty or the agent already exited.
# Usage: nomad_agent_stop AGENT_PID
nomad_agent_stop() {
    [[ -n "$1" ]] || return 0
    kill -0 "$1" 2>/dev/null || return 0
    nomad_agent_interrupt "$1"
    kill -KILL -- "-$1" 2>/dev/null || true
}

# Prints the ids of the processes whose command line contains DIR. Everything the agent started
# in its work dir (plugins, executors, logmon, QEMU) has it there, even after re-parenting.
# Usage: nomad_agent_pids_in_dir DIR
nomad_agent_pids_in_dir() {
    local file pid
    for file in /proc/[0-9]*/cmdline; do
        pid="${file#/proc/}"
        pid="${pid%/cmdline}"
        [[ "$pid" == "$$" || "$pid" == "$BASHPID" ]] && continue
        if tr '\0' ' ' 2>/dev/null <"$file" | grep -q -F -- "$1"; then
            echo "$pid"
        fi
    done
}

# Kills every process left in the work dir WORK, unmounts what the agent mounted below it and
# removes it. Stop the agent first, see nomad_agent_stop.
# Usage: nomad_agent_remove_work_dir WORK
nomad_agent_remove_work_dir() {
    local work="$1" pid
    for pid in $(nomad_agent_pids_in_dir "$work"); do
        kill -KILL "$pid" 2>/dev/null || true
    done
    # The Nomad client mounts a tmpfs per task that it removes only at garbage collection.
    grep -o -- "${work}[^ ]*" /proc/self/mounts | sort -r | xargs -r -n 1 umount --lazy || true
    rm -rf -- "$work"
}
