#!/usr/bin/env bash
# Start a real, throw-away SLURM on this machine (as root), for trying launchers/submit.py end-to-end.
#
#   slurm/local-cluster/start.sh            one node on localhost, named like this machine (so it resolves)
#   slurm/local-cluster/start.sh --netns N  N nodes (node1..nodeN), each in its own network namespace on a bridge,
#                                           so multi-node jobs really talk over a network (gloo over interface sovit0)
#
# Idempotent: if the same cluster is already up it only prints how to use it; a different shape is restarted.
# Prints the line to eval: `eval "$(slurm/local-cluster/start.sh --netns 2)"` exports SLURM_CONF.
# Everything lives under $SOVIT_SLURM_DIR (default /var/tmp/sovit-slurm), with the list of namespaces, bridge and
# /etc/hosts entries made here; stop.sh undoes exactly those, so a second cluster (own SOVIT_SLURM_DIR and
# SOVIT_SLURM_PORT) survives it. One --netns cluster at a time: they would share the bridge and node names.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
state=${SOVIT_SLURM_DIR:-/var/tmp/sovit-slurm}
ctld_port=${SOVIT_SLURM_PORT:-6817}
bridge=sovitbr0
subnet=10.77.0            # private, only our own namespaces live on it
netns=0

while [ $# -gt 0 ]; do
  case "$1" in
    --netns) netns=${2:?--netns needs a node count}; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "start.sh: unknown argument '$1': expected [--netns N]" >&2; exit 2 ;;
  esac
done
case "$netns" in ''|*[!0-9]*) echo "start.sh: --netns '$netns' is invalid: expected a node count >= 1" >&2; exit 2 ;; esac
# slurmd puts each step's socket at $state/spool/<node>/<node>_<job>.<step>, 30 + 2 x the node name's length
# characters after $state, and a Unix socket path holds 107: past that every job fails to launch and is held.
node_len=$([ "$netns" -eq 0 ] && hostname -s | tr -d '\n' | wc -c || echo $(( 4 + ${#netns} )))
max_state=$(( 107 - 30 - 2 * node_len ))
[ "${#state}" -le "$max_state" ] || { echo "start.sh: SOVIT_SLURM_DIR '$state' is ${#state} characters: slurmd's" \
  "step sockets under it would pass a Unix socket path's 108 bytes; expected at most $max_state" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "start.sh: must run as root (it starts slurmctld, slurmd and munged)" >&2; exit 1; }
for bin in slurmctld slurmd munged scontrol sinfo; do
  command -v "$bin" >/dev/null || { echo "start.sh: '$bin' not found: apt-get install slurm-wlm munge" >&2; exit 1; }
done
[ "$netns" -eq 0 ] || command -v ip >/dev/null || { echo "start.sh: 'ip' not found: apt-get install iproute2" >&2; exit 1; }

shape="nodes=$([ "$netns" -eq 0 ] && echo local || echo "netns:$netns") port=$ctld_port"
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$state/run/slurmctld.pid" && [ "$(cat "$state/shape" 2>/dev/null)" = "$shape" ]; then
  echo "start.sh: cluster already running ($shape)" >&2
  echo "export SLURM_CONF=$state/slurm.conf"
  exit 0
fi
"$here/stop.sh" >/dev/null 2>&1 || true

mkdir -p "$state"/{ctld,run,log,spool,munge}
chmod 700 "$state/munge"

# --- munge: a private key and socket ------------------------------------------------------------
[ -s "$state/munge/munge.key" ] || dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$state/munge/munge.key"
munged --force --key-file="$state/munge/munge.key" --socket="$state/munge/munge.socket" \
  --pid-file="$state/run/munged.pid" --log-file="$state/log/munged.log" --seed-file="$state/munge/munged.seed"

# --- nodes ----------------------------------------------------------------------------------------
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 ))
host=$(hostname)
nodes_conf=""
if [ "$netns" -eq 0 ]; then
  ctld_addr=127.0.0.1
  # Jobs use the node name as MASTER_ADDR: it must resolve (a made-up node1 would not, and every job would hang at
  # rendezvous), so the node is called like this machine, or localhost if even that does not resolve.
  node=$(hostname -s)
  getent hosts "$node" >/dev/null || node=localhost
  nodes_conf="NodeName=$node NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$(( mem_mb / 2 )) State=UNKNOWN"
else
  ctld_addr=$subnet.1
  if ip link show "$bridge" >/dev/null 2>&1; then
    echo "start.sh: bridge $bridge exists: another --netns cluster runs (stop it with SOVIT_SLURM_DIR=<its dir>" \
         "slurm/local-cluster/stop.sh), or start this one without --netns" >&2
    exit 1
  fi
  # Every node sees all CPUs and a share of the memory: the kernel is shared, SLURM only does the bookkeeping.
  per_node_mem=$(( mem_mb / (2 * netns) ))
  ip link add "$bridge" type bridge
  echo "$bridge" > "$state/bridge"   # what stop.sh removes: only what this cluster created
  ip addr add "$ctld_addr/24" dev "$bridge"
  ip link set "$bridge" up
  hosts_block="# BEGIN sovit-local-cluster $state"$'\n'
  for i in $(seq 1 "$netns"); do
    ns=sovit-node$i addr=$subnet.$((10 + i))
    ip netns add "$ns"
    echo "$ns" >> "$state/netns"
    ip link add "sovitv$i" type veth peer name sovit0 netns "$ns"
    ip link set "sovitv$i" master "$bridge" up
    ip -n "$ns" addr add "$addr/24" dev sovit0
    ip -n "$ns" link set sovit0 up
    ip -n "$ns" link set lo up
    nodes_conf+="NodeName=node$i NodeHostname=$host NodeAddr=$addr CPUs=$cpus RealMemory=$per_node_mem State=UNKNOWN"$'\n'
    hosts_block+="$addr node$i"$'\n'
  done
  # Node names resolve like on a real cluster (MASTER_ADDR is the first node's name).
  printf '%s# END sovit-local-cluster %s\n' "$hosts_block" "$state" >> /etc/hosts
fi

sed -e "s|@STATE@|$state|g" -e "s|@CTLD_HOST@|$host|g" -e "s|@CTLD_ADDR@|$ctld_addr|g" \
    -e "s|@CTLD_PORT@|$ctld_port|g" -e "s|@SLURMD_PORT@|$((ctld_port + 1))|g" \
    "$here/slurm.conf.in" | awk -v nodes="$nodes_conf" '{ if ($0 == "@NODES@") printf "%s\n", nodes; else print }' \
    > "$state/slurm.conf"
export SLURM_CONF=$state/slurm.conf

# --- daemons --------------------------------------------------------------------------------------
slurmctld -f "$SLURM_CONF" -i   # -i: ignore old state, start clean
if [ "$netns" -eq 0 ]; then
  slurmd -f "$SLURM_CONF" -N "$node"
else
  # nsenter --net (not `ip netns exec`, which remounts /sys and breaks slurmd's cgroup/sysfs probing)
  for i in $(seq 1 "$netns"); do
    nsenter --net=/var/run/netns/sovit-node$i slurmd -f "$SLURM_CONF" -N "node$i"
  done
fi
echo "$shape" > "$state/shape"

want=$([ "$netns" -eq 0 ] && echo 1 || echo "$netns")
for _ in $(seq 1 60); do
  idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
  [ "$idle" -ge "$want" ] && break
  sleep 1
done
if [ "$idle" -lt "$want" ]; then
  echo "start.sh: only $idle of $want nodes became idle in 60 s; see $state/log/" >&2
  sinfo -N >&2 || true
  exit 1
fi
echo "start.sh: SLURM up ($shape), state and logs in $state" >&2
echo "export SLURM_CONF=$SLURM_CONF"
