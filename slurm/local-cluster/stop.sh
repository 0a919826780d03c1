#!/usr/bin/env bash
# Stop the cluster start.sh started under LOCAL_SLURM_ROOT: cancel its jobs, then stop its slurmd's,
# slurmctld and (only if start.sh started it) munged, each by its pid file, never by name.
# Removes the /etc/hosts line and the /etc/slurm/slurm.conf link it added. Packages stay.
#   --purge   also delete the state root (logs included)
set -uo pipefail

ROOT=${LOCAL_SLURM_ROOT:-${TMPDIR:-/tmp}/performer-slurm}
[ -d "$ROOT" ] || { echo "[local-cluster] nothing under $ROOT" >&2; exit 0; }
ROOT=$(cd "$ROOT" && pwd)
MARK="# performer local-cluster"
export SLURM_CONF=$ROOT/slurm.conf

say() { echo "[local-cluster] $*" >&2; }
running() {
  [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2"* ]] && ! grep -q '^State:.*zombie' "/proc/$1/status"
}
alive() { local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && running "$pid" "$2"; }
# stop PIDFILE NAME: SIGTERM, SIGKILL after 15 s; only while the pid still belongs to NAME
# (daemons delete their own pid file on the way out: poll the pid, not the file)
stop() {
  local pid
  if alive "$1" "$2"; then
    pid=$(cat "$1")
    say "stopping $2 (pid $pid)"
    kill -TERM "$pid"
    for _ in $(seq 150); do running "$pid" "$2" || break; sleep 0.1; done
    running "$pid" "$2" && kill -KILL "$pid"
  fi
  rm -f "$1"
}

if alive "$ROOT/pid/slurmctld.pid" slurmctld; then
  jobs=$(squeue -h -o %A 2>/dev/null | xargs)
  if [ -n "$jobs" ]; then
    say "cancelling jobs $jobs"
    # shellcheck disable=SC2086
    scancel $jobs
    for _ in $(seq 60); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi
for f in "$ROOT"/pid/slurmd-*.pid; do [ -e "$f" ] && stop "$f" slurmd; done
stop "$ROOT/pid/slurmctld.pid" slurmctld
stop "$ROOT/pid/munged.pid" munged

if [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$ROOT/slurm.conf" ]; then
  rm -f /etc/slurm/slurm.conf
fi
if grep -qF -- "$MARK $ROOT" /etc/hosts; then
  # rewritten in place: /etc/hosts may be a bind mount
  kept=$(grep -vF -- "$MARK $ROOT" /etc/hosts)
  printf '%s\n' "$kept" > /etc/hosts
fi
[ "${1:-}" = "--purge" ] && rm -rf "${ROOT:?}"
say "stopped"
