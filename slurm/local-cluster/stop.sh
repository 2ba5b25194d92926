#!/usr/bin/env bash
# Stop the local SLURM started by start.sh (the one in $SOVIT_SLURM_DIR): daemons, and the namespaces, bridge and
# /etc/hosts entries that start.sh listed there as its own. Safe to run twice.
# Logs stay in $SOVIT_SLURM_DIR/log for post-mortems; the controller state is discarded.
set -uo pipefail

state=${SOVIT_SLURM_DIR:-/var/tmp/sovit-slurm}

stop_pid() {  # stop_pid FILE: TERM the daemon in FILE, wait up to 10 s, then KILL it
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null
  fi
  rm -f "$f"
}

# Cancel jobs first: their slurmstepd processes would outlive slurmd.
if [ -f "$state/slurm.conf" ] && [ -f "$state/run/slurmctld.pid" ] && kill -0 "$(cat "$state/run/slurmctld.pid")" 2>/dev/null; then
  export SLURM_CONF=$state/slurm.conf
  scancel --quiet --full $(squeue -h -o %i 2>/dev/null) 2>/dev/null
  for _ in $(seq 1 40); do [ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ] && break; sleep 0.5; done
fi

for f in "$state"/run/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f"; done
stop_pid "$state/run/slurmctld.pid"
stop_pid "$state/run/munged.pid"

# Only the network this cluster's start.sh created (listed in $state): another cluster's namespaces stay.
if [ -f "$state/netns" ]; then
  while read -r ns; do ip netns delete "$ns" 2>/dev/null; done < "$state/netns"
fi
[ -f "$state/bridge" ] && ip link delete "$(cat "$state/bridge")" 2>/dev/null
if grep -qxF "# BEGIN sovit-local-cluster $state" /etc/hosts 2>/dev/null; then
  # rewrite in place (not sed -i: /etc/hosts is often a bind mount that cannot be replaced)
  hosts=$(awk -v b="# BEGIN sovit-local-cluster $state" -v e="# END sovit-local-cluster $state" \
    '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' /etc/hosts)
  printf '%s\n' "$hosts" > /etc/hosts
fi
rm -rf "$state/ctld" "$state/spool" "$state/shape" "$state/netns" "$state/bridge"
echo "stop.sh: local SLURM stopped (logs kept in $state/log)"
