#!/usr/bin/env bash
# Start a throw-away Slurm cluster on this machine: NODES emulated nodes (node1..nodeN), one
# slurmd each, all on 127.0.0.1, with Debian's slurmctld/slurmd/munge (Slurm >= 22.05, root).
# For CI and for trying the sbatch scripts; see slurm/README.md. Idempotent.
#
# Everything it owns lives under the state root: slurm.conf, pid files, logs, spool, state.
# Clients find the cluster through SLURM_CONF (printed at the end); /etc/slurm/slurm.conf becomes a
# link to ours only if there was none. An existing slurm.conf, munged or host entry is never
# replaced. Stop with stop.sh and the same LOCAL_SLURM_ROOT: it stops only what this script started.
#
#   LOCAL_SLURM_ROOT   state root                          [${TMPDIR:-/tmp}/performer-slurm]
#   LOCAL_SLURM_NODES  emulated nodes                      [2]
#   LOCAL_SLURM_CPUS   CPUs per node (may exceed nproc)    [nproc]
#   LOCAL_SLURM_PORT   slurmctld port; slurmd i uses +i    [16817]
#   LOCAL_SLURM_LINK   link /etc/slurm/slurm.conf to ours if there is none (1) or never (0)  [1]
set -euo pipefail

ROOT=${LOCAL_SLURM_ROOT:-${TMPDIR:-/tmp}/performer-slurm}
NODES=${LOCAL_SLURM_NODES:-2}
CPUS=${LOCAL_SLURM_CPUS:-$(nproc)}
PORT=${LOCAL_SLURM_PORT:-16817}
MARK="# performer local-cluster"
CONF=$ROOT/slurm.conf
export SLURM_CONF=$CONF

say() { echo "[local-cluster] $*" >&2; }
die() { say "error: $*"; exit 1; }
# running PID NAME: a live process whose command is NAME (a reused pid is someone else's)
running() {
  [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2"* ]] && ! grep -q '^State:.*zombie' "/proc/$1/status"
}
# alive PIDFILE NAME: the pid file names a running NAME
alive() { local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && running "$pid" "$2"; }
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"
ROOT=$(mkdir -p "$ROOT" && cd "$ROOT" && pwd)
CONF=$ROOT/slurm.conf
SLURM_CONF=$CONF
mkdir -p "$ROOT"/{pid,log,state,spool}

# 1. packages
packages=(slurmctld slurmd slurm-client munge)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# 2. munge: reuse a running munged, else start one and keep its pid
if munge_ok; then
  say "munged is already running"
else
  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown -R munge:munge /etc/munge && chmod 0700 /etc/munge && chmod 0600 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- munged
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged did not start"
  cp /run/munge/munged.pid "$ROOT/pid/munged.pid"
fi

# 3. node names must resolve: jobs take MASTER_ADDR from the node list
nodes=()
for i in $(seq "$NODES"); do nodes+=("node$i"); done
unresolved=()
for n in "${nodes[@]}"; do getent hosts "$n" >/dev/null || unresolved+=("$n"); done
if [ ${#unresolved[@]} -gt 0 ]; then
  echo "127.0.0.1 ${unresolved[*]} $MARK $ROOT" >> /etc/hosts
fi

# 4. configuration, ours alone
new=$(mktemp)
cat > "$new" <<EOF
$MARK
ClusterName=performer
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=4
SchedulerParameters=sched_interval=2,bf_interval=2
# job ids (and so the jobs' MASTER_PORTs) differ between clusters with different state roots
FirstJobId=$(( $(cksum <<<"$ROOT" | cut -d' ' -f1) % 9000 * 100 + 1000 ))
KillWait=10
# a requeued job may start again after cred_expire seconds (default 120)
AuthInfo=cred_expire=10
MailProg=/bin/true
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/pid/slurmctld.pid
SlurmdPidFile=$ROOT/pid/slurmd-%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd-%n.log
EOF
for i in $(seq "$NODES"); do
  echo "NodeName=node$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$CPUS State=UNKNOWN" >> "$new"
done
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$new"

ours_alive=0
alive "$ROOT/pid/slurmctld.pid" slurmctld && ours_alive=1
for n in "${nodes[@]}"; do alive "$ROOT/pid/slurmd-$n.pid" slurmd && ours_alive=1; done
if ! cmp -s "$new" "$CONF"; then
  [ "$ours_alive" -eq 0 ] || { rm -f "$new"; die "running with another configuration: stop.sh first"; }
  install -m 0644 "$new" "$CONF"
fi
rm -f "$new"
if [ "${LOCAL_SLURM_LINK:-1}" = 1 ] && [ ! -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ]; then
  mkdir -p /etc/slurm && ln -s "$CONF" /etc/slurm/slurm.conf
fi

# 5. daemons; a controller that starts gets a fresh state (no jobs survive a restart)
if ! alive "$ROOT/pid/slurmctld.pid" slurmctld; then
  rm -rf "${ROOT:?}/state" && mkdir -p "$ROOT/state"
  slurmctld -f "$CONF" -i
  for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
  scontrol ping >/dev/null 2>&1 || { tail -n 20 "$ROOT/log/slurmctld.log" >&2; die "slurmctld did not start"; }
fi
for n in "${nodes[@]}"; do
  if ! alive "$ROOT/pid/slurmd-$n.pid" slurmd; then
    rm -rf "${ROOT:?}/spool/$n" && mkdir -p "$ROOT/spool/$n"
    slurmd -f "$CONF" -N "$n"
  fi
done

# 6. wait until every node is idle
for _ in $(seq 120); do
  [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -eq "$NODES" ] && break
  sleep 0.5
done
[ "$(sinfo -h -N -t idle -o %N | sort -u | wc -l)" -eq "$NODES" ] ||
  { sinfo -N >&2; tail -n 20 "$ROOT"/log/*.log >&2; die "nodes are not idle after 60 s"; }
say "ready: ${NODES} nodes x ${CPUS} CPUs, partition debug, logs in $ROOT/log"
echo "export SLURM_CONF=$CONF"
