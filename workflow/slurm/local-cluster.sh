#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine (127.0.0.1), for the tests and for trying the
# slurm profile without a cluster:
#
#   eval "$(bash workflow/slurm/local-cluster.sh start)"   # prints `export SLURM_CONF=...`
#   snakemake --profile workflow/profiles/slurm --slurm-status-command squeue \
#       --slurm-init-seconds-before-status-checks 2 --max-threads "$(nproc)"
#   bash workflow/slurm/local-cluster.sh stop
#
# It installs Debian's slurm-wlm and munge when they are missing (root, apt), starts munged,
# slurmctld and slurmd with a slurm.conf written under $LOCAL_SLURM_DIR (default: .slurm/ in the
# project), on free ports so that several checkouts can each run one. No accounting daemon: status
# comes from squeue (MinJobAge keeps finished jobs visible for an hour).
# Exit status 3 means "cannot run a cluster here" (no root, no apt, daemons refuse to start): the
# message says why, and the tests skip with it.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="$(mkdir -p "${LOCAL_SLURM_DIR:-$ROOT/.slurm}" && cd "${LOCAL_SLURM_DIR:-$ROOT/.slurm}" && pwd)"
CONF="$DIR/etc/slurm.conf"

cannot() { echo "local-cluster: cannot start a SLURM cluster here: $*" >&2; exit 3; }

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return
    [ "$(id -u)" = 0 ] || cannot "slurm-wlm and munge are not installed and installing them needs root"
    command -v apt-get >/dev/null || cannot "slurm-wlm and munge are not installed and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurm-wlm munge >"$DIR/log/apt.log" 2>&1 \
        || { apt-get update -q >>"$DIR/log/apt.log" 2>&1 \
             && apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$DIR/log/apt.log" 2>&1; } \
        || cannot "apt-get install slurm-wlm munge failed (log: $DIR/log/apt.log)"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

write_conf() {
    local cpus mem ctld_port slurmd_port
    cpus="$(nproc)"
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # MiB, leave 10% to the OS
    ctld_port="$(free_port)"; slurmd_port="$(free_port)"
    while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port="$(free_port)"; done
    rm -rf "$DIR/state" "$DIR/spool"  # a fresh cluster: no jobs or node state from a previous start
    mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool"
    sed -e "s|@DIR@|$DIR|g" -e "s|@HOST@|$(hostname -s)|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEM@|$mem|g" \
        -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$slurmd_port|g" \
        "$ROOT/workflow/slurm/slurm.conf.in" >"$CONF"
}

# snakemake-executor-plugin-slurm-jobstep (0.6.1) drops every SLURM_* variable, SLURM_CONF too,
# before the `srun` that starts a rule inside its job; that srun then reads the default path. Point
# the default path at this cluster's config, never over a real one (a regular file there).
DEFAULT_CONF=/etc/slurm/slurm.conf

claim_default_conf() {
    if [ -e "$DEFAULT_CONF" ] && [ ! -L "$DEFAULT_CONF" ]; then
        cannot "$DEFAULT_CONF is a real SLURM configuration: this machine belongs to another cluster"
    fi
    mkdir -p "$(dirname "$DEFAULT_CONF")"
    ln -sfn "$CONF" "$DEFAULT_CONF"
}

release_default_conf() {
    if [ -L "$DEFAULT_CONF" ] && [ "$(readlink "$DEFAULT_CONF")" = "$CONF" ]; then rm -f "$DEFAULT_CONF"; fi
}

running() { [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

start_munge() {
    # One munged serves the machine; start it only if none answers.
    if munge -n </dev/null >/dev/null 2>&1; then return; fi
    [ "$(id -u)" = 0 ] || cannot "munged is not running and starting it needs root"
    [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; } >/dev/null 2>&1 \
        || cannot "no /etc/munge/munge.key and none could be made"
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    runuser -u munge -- /usr/sbin/munged >>"$DIR/log/munged.log" 2>&1 || cannot "munged did not start"
    for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && return; sleep 0.1; done
    cannot "munged started but does not answer"
}

start() {
    mkdir -p "$DIR/log"
    if running slurmctld && running slurmd; then
        echo "local-cluster: already running ($CONF)" >&2; echo "export SLURM_CONF=$CONF"; return
    fi
    [ "$(id -u)" = 0 ] || cannot "the daemons run as root (SlurmUser=root) and this is uid $(id -u)"
    install
    stop >/dev/null 2>&1 || true
    write_conf
    claim_default_conf
    start_munge
    export SLURM_CONF="$CONF"
    slurmctld -f "$CONF" || cannot "slurmctld did not start (log: $DIR/log/slurmctld.log)"
    # slurmd registers once at start and retries only much later: wait for the controller first.
    for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
    slurmd -f "$CONF" -N localhost || cannot "slurmd did not start (log: $DIR/log/slurmd.log)"
    for _ in $(seq 100); do
        if [ "$(sinfo -h -N -o %T 2>/dev/null)" = "idle" ]; then
            echo "local-cluster: started, config $CONF, logs in $DIR/log" >&2; echo "export SLURM_CONF=$CONF"; return
        fi
        sleep 0.2
    done
    cannot "the node did not become idle in 20 s ($(sinfo -h -N -o '%T %E' 2>&1); logs in $DIR/log)"
}

stop() {
    [ -f "$CONF" ] || return 0
    export SLURM_CONF="$CONF"
    running slurmctld && timeout 10 scancel --quiet --user "$(id -un)" 2>/dev/null || true
    for daemon in slurmd slurmctld; do
        if running "$daemon"; then
            kill "$(cat "$DIR/$daemon.pid")" 2>/dev/null || true
            for _ in $(seq 50); do running "$daemon" || break; sleep 0.1; done
            running "$daemon" && kill -9 "$(cat "$DIR/$daemon.pid")" 2>/dev/null || true
        fi
        rm -f "$DIR/$daemon.pid"
    done
    release_default_conf
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    status) export SLURM_CONF="$CONF"; sinfo && squeue ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
