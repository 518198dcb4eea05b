#!/usr/bin/env bash
# One node of a multi-node run without ssh between nodes: start this on every node at about the same time
# (by hand, a scheduler, or launch/slurm.sbatch); DeepSpeed's launcher (`--no_ssh`) starts this node's
# processes and they meet at MASTER_ADDR:MASTER_PORT.
#
#   NUM_NODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/node.sh --config configs/rgbnt201.yaml [--resume] [key=value ...]
#   launch/node.sh --num-nodes 2 --node-rank 1 --master-addr 10.0.0.1 -- --config configs/rgbnt201.yaml ...
#
# Settings (a flag wins over the variable of the same name):
#   --num-nodes      NUM_NODES        nodes in the run (required)
#   --node-rank      NODE_RANK        this node, 0 .. NUM_NODES-1; node 0 holds ranks 0 .. NPROC_PER_NODE-1 (required)
#   --master-addr    MASTER_ADDR      address of node 0 that every node can reach (required)
#   --master-port    MASTER_PORT      a free TCP port on node 0 (default 29500)
#   --nproc-per-node NPROC_PER_NODE   processes on each node (default: the node's GPU count, 1 without GPUs)
#   --hostfile       HOSTFILE         DeepSpeed hostfile listing every node (default: one is written, see below)
# Everything after the settings (or after `--`) goes to launch/train.py unchanged. DEEPSPEED names the
# launcher command (default: `deepspeed` on PATH).
#
# `--no_ssh` still wants a hostfile that lists every node, but only the count and the slots matter: the
# names are labels. Without HOSTFILE one with NUM_NODES lines "nodeI slots=NPROC_PER_NODE" is written under
# TMPDIR (all nodes must then have the same number of processes); its name says what it holds, so runs with
# the same shape share it and nothing needs removing afterwards.
#
# The environment passes through unchanged: MLFLOW_* (tracking URI, credentials), OMP_NUM_THREADS,
# TORCH_EXTENSIONS_DIR reach every process of this node. GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME name the
# network interface the ranks use; when unset, this node's route to MASTER_ADDR chooses it (launch/ifname.sh),
# since gloo would otherwise bind to whatever the node's own name resolves to (often a loopback address).
#
# Exit status (through launch/ds_run.py, which runs DeepSpeed's runner): 0 done; 2 a user error (one `error:`
# line); 128+N stopped by signal N (SIGTERM to this script, or to its process group: 143; the ranks stop at a
# step boundary with a checkpoint, --resume continues) or DeepSpeed's launcher killed by signal N (137 for
# SIGKILL; plain `deepspeed` exits 0 then); otherwise the failing rank's status. DeepSpeed's launcher gives the
# ranks 30 s between its SIGTERM and SIGKILL.
set -euo pipefail

die() { echo "launch/node.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --num-nodes) NUM_NODES=${2:?--num-nodes needs a value}; shift 2 ;;
    --node-rank) NODE_RANK=${2:?--node-rank needs a value}; shift 2 ;;
    --master-addr) MASTER_ADDR=${2:?--master-addr needs a value}; shift 2 ;;
    --master-port) MASTER_PORT=${2:?--master-port needs a value}; shift 2 ;;
    --nproc-per-node) NPROC_PER_NODE=${2:?--nproc-per-node needs a value}; shift 2 ;;
    --hostfile) HOSTFILE=${2:?--hostfile needs a value}; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
[ -n "${NUM_NODES:-}" ] || die "NUM_NODES (or --num-nodes) is not set: how many nodes take part"
[ -n "${NODE_RANK:-}" ] || die "NODE_RANK (or --node-rank) is not set: this node's index, 0 .. NUM_NODES-1"
[ -n "${MASTER_ADDR:-}" ] || die "MASTER_ADDR (or --master-addr) is not set: an address of node 0 every node can reach"
MASTER_PORT=${MASTER_PORT:-29500}
is_int "$NUM_NODES" && [ "$NUM_NODES" -ge 1 ] || die "NUM_NODES=$NUM_NODES: expected a whole number >= 1"
is_int "$NODE_RANK" && [ "$NODE_RANK" -lt "$NUM_NODES" ] || die "NODE_RANK=$NODE_RANK: expected 0 .. $((NUM_NODES - 1))"
is_int "$MASTER_PORT" && [ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ] \
  || die "MASTER_PORT=$MASTER_PORT: expected a TCP port 1 .. 65535"
[ $# -gt 0 ] || die "no training arguments: pass at least --config FILE (they go to launch/train.py)"

cd "$(dirname "$0")/.."    # train.py, configs and relative data paths are resolved from the repository root
DEEPSPEED=${DEEPSPEED:-deepspeed}
command -v "$DEEPSPEED" >/dev/null || die "'$DEEPSPEED' not found: activate the project's .venv or set DEEPSPEED"
if dev=$(launch/ifname.sh "$MASTER_ADDR"); then
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$dev} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$dev}
fi

if [ -z "${HOSTFILE:-}" ]; then
  if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(python -c "import torch; print(max(1, torch.cuda.device_count()))") \
      || die "could not count this node's GPUs with python/torch: set NPROC_PER_NODE"
  fi
  is_int "$NPROC_PER_NODE" && [ "$NPROC_PER_NODE" -ge 1 ] || die "NPROC_PER_NODE=$NPROC_PER_NODE: expected >= 1"
  HOSTFILE="${TMPDIR:-/tmp}/mfrnet_ds_hostfile.u$(id -u).${NUM_NODES}x$NPROC_PER_NODE"
  tmp=$(mktemp "$HOSTFILE.XXXXXX")
  for ((i = 0; i < NUM_NODES; i++)); do echo "node$i slots=$NPROC_PER_NODE"; done > "$tmp"
  mv -f "$tmp" "$HOSTFILE"      # whole, even while another run of the same shape reads it
else
  [ -f "$HOSTFILE" ] || die "HOSTFILE=$HOSTFILE does not exist"
  lines=$(grep -cvE '^[[:space:]]*(#|$)' "$HOSTFILE" || true)
  [ "$lines" -eq "$NUM_NODES" ] || die "HOSTFILE=$HOSTFILE lists $lines nodes but NUM_NODES=$NUM_NODES"
fi

command -v python3 >/dev/null || die "python3 not found: it starts launch/ds_run.py"
echo "launch/node.sh: node $NODE_RANK of $NUM_NODES, master $MASTER_ADDR:$MASTER_PORT, hostfile $HOSTFILE," \
  "interface ${GLOO_SOCKET_IFNAME:-gloo default}" >&2
exec python3 launch/ds_run.py "$DEEPSPEED" --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" launch/train.py "$@"
