#!/usr/bin/env bash
# Multi-node training over ssh: run this once, on the first node of the hostfile; DeepSpeed's launcher
# starts launch/train.py on every listed node through pdsh.
#
#   launch/multinode_ssh.sh --hostfile my_hosts --config configs/rgbnt201.yaml [--resume] [key=value ...]
#   HOSTFILE=my_hosts MASTER_PORT=29600 launch/multinode_ssh.sh --config configs/rgbnt201.yaml
#
# Settings (a flag wins over the variable of the same name):
#   --hostfile     HOSTFILE      DeepSpeed hostfile (see launch/hostfile.example) (required)
#   --master-addr  MASTER_ADDR   address of the first host that every node can reach
#                                (default: DeepSpeed asks the first host over ssh for `hostname -I`)
#   --master-port  MASTER_PORT   a free TCP port on the first host (default 29500)
#   --num-nodes    NUM_NODES     use only the first N hosts (default: all)
# Everything after the settings (or after `--`) goes to launch/train.py unchanged. DEEPSPEED names the
# launcher command (default: `deepspeed` on PATH).
#
# Needs: pdsh, passwordless ssh from here to every host, and this repository with its .venv at the same
# path on every node (DeepSpeed runs `cd <this directory>; <this python> -m deepspeed.launcher.launch` there;
# data and output paths must also resolve on every node: a shared filesystem, or copies at the same path).
#
# Environment on the other nodes: DeepSpeed passes on every variable whose name starts with MLFLOW
# (tracking URI, credentials), PYTHON, UCX, MV2, and NCCL on GPUs. It writes them into the remote shell
# command as `export KEY=VALUE;` without quoting, so this script refuses values with spaces or shell
# characters. Anything else (GLOO_SOCKET_IFNAME, OMP_NUM_THREADS, ...) goes as KEY=VALUE lines into
# .deepspeed_env in the repository root or in your home directory; DeepSpeed reads both.
#
# Exit status (through launch/ds_run.py): the largest of the nodes' (pdsh -S): 0 done, 2 a user error, 143 the
# ranks stopped on SIGTERM with a checkpoint; 128+N when pdsh itself was killed by signal N (plain `deepspeed`
# exits 0 then). SIGTERM/SIGINT here: DeepSpeed's runner signals pdsh and runs `pkill -f` of the training
# command on every node (the ranks get SIGTERM and save), then exits 1 a second later without waiting for them.
set -euo pipefail

die() { echo "launch/multinode_ssh.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --hostfile) HOSTFILE=${2:?--hostfile needs a value}; shift 2 ;;
    --master-addr) MASTER_ADDR=${2:?--master-addr needs a value}; shift 2 ;;
    --master-port) MASTER_PORT=${2:?--master-port needs a value}; shift 2 ;;
    --num-nodes) NUM_NODES=${2:?--num-nodes needs a value}; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

[ -n "${HOSTFILE:-}" ] || die "HOSTFILE (or --hostfile) is not set: a DeepSpeed hostfile, see launch/hostfile.example"
HOSTFILE=$(realpath "$HOSTFILE" 2>/dev/null) && [ -f "$HOSTFILE" ] || die "hostfile ${HOSTFILE:-} does not exist"
[ $# -gt 0 ] || die "no training arguments: pass at least --config FILE (they go to launch/train.py)"
MASTER_PORT=${MASTER_PORT:-29500}
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT=$MASTER_PORT: expected a TCP port"
command -v pdsh >/dev/null || die "pdsh not found: install it on this node, or start launch/node.sh on every node instead (no ssh needed)"
cd "$(dirname "$0")/.."
DEEPSPEED=${DEEPSPEED:-deepspeed}
command -v "$DEEPSPEED" >/dev/null || die "'$DEEPSPEED' not found: activate the project's .venv or set DEEPSPEED"

while IFS='=' read -r name value; do
  [[ "$value" =~ ^[A-Za-z0-9_./:@%+,=-]*$ ]] \
    || die "$name has spaces or shell characters, which DeepSpeed's pdsh command would split: put it in .deepspeed_env quoted, or simplify it"
done < <(env | grep -E '^(MLFLOW|PYTHON|UCX|MV2|NCCL)[A-Za-z0-9_]*=' || true)

args=(--hostfile "$HOSTFILE" --launcher pdsh --master_port "$MASTER_PORT")
[ -z "${MASTER_ADDR:-}" ] || args+=(--master_addr "$MASTER_ADDR")
[ -z "${NUM_NODES:-}" ] || args+=(--num_nodes "$NUM_NODES")
command -v python3 >/dev/null || die "python3 not found: it starts launch/ds_run.py"
exec python3 launch/ds_run.py "$DEEPSPEED" "${args[@]}" launch/train.py "$@"
