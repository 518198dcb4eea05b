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
#                                (default: the first host's first `hostname -I` address, asked over ssh)
#   --master-port  MASTER_PORT   a free TCP port on the first host (default 29500)
#   --num-nodes    NUM_NODES     use only the first N hosts (default: all)
# Everything after the settings (or after `--`) goes to launch/train.py unchanged. DEEPSPEED names the
# launcher command (default: `deepspeed` on PATH).
#
# Needs: pdsh, passwordless ssh from here to every host, and this repository with its .venv at the same
# path on every node (DeepSpeed runs `cd <this directory>; <this python> -m deepspeed.launcher.launch` there;
# data, output paths and TORCH_EXTENSIONS_DIR must also resolve on every node: a shared filesystem, or copies
# at the same path). DeepSpeed's CPU op is built here first (launch/build_ops.py), so that no rank compiles it
# inside the start-up rendezvous.
#
# Environment on the other nodes: DeepSpeed passes on every variable whose name starts with MLFLOW
# (tracking URI, credentials), PYTHON, UCX, MV2, and NCCL on GPUs, as `export KEY="VALUE";` in the remote
# shell command: spaces and `?` arrive intact, but `$`, backticks, `"` and `\` would be expanded or break the
# command, so this script refuses values with them. It also passes, through a DeepSpeed env file it writes
# (DS_ENV_FILE, under TMPDIR), this shell's PATH (the .venv, the `ninja` that built the op),
# TORCH_EXTENSIONS_DIR, and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME: when unset, the interface of this node's
# route to MASTER_ADDR (launch/ifname.sh), which then must have the same name on every node (set them when not).
# KEY=VALUE lines of your own in .deepspeed_env (home directory, then repository root) are added after these.
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

unsafe() { [[ "$1" == *[\$\`\"\\]* ]]; }
for name in $(compgen -e); do
  case "$name" in MLFLOW*|PYTHON*|UCX*|MV2*|NCCL*)
    ! unsafe "${!name}" || die "$name contains \$, \`, \" or \\, which DeepSpeed's pdsh command cannot pass on:" \
      "set it on every node instead (for MLflow credentials: ~/.mlflow/credentials), or start launch/node.sh" \
      "on every node (it passes the environment unchanged)" ;;
  esac
done

first_host=$(grep -vE '^[[:space:]]*(#|$)' "$HOSTFILE" | awk 'NR == 1 {print $1}')
[ -n "$first_host" ] || die "hostfile $HOSTFILE lists no host"
if [ -z "${MASTER_ADDR:-}" ]; then
  MASTER_ADDR=$(ssh "$first_host" hostname -I | awk '{print $1}') && [ -n "$MASTER_ADDR" ] \
    || die "could not ask $first_host for its address over ssh (hostname -I): set MASTER_ADDR"
fi
if dev=$(launch/ifname.sh "$MASTER_ADDR"); then
  GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$dev} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$dev}
fi

# DeepSpeed's env file: KEY=VALUE lines only (it breaks on blank and comment lines); named by its content, so
# runs with the same settings share it and nothing needs removing afterwards.
env_lines=("PATH=$PATH")
for name in TORCH_EXTENSIONS_DIR GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
  [ -z "${!name:-}" ] || env_lines+=("$name=${!name}")
done
for f in "$HOME/.deepspeed_env" "$PWD/.deepspeed_env"; do
  if [ -f "$f" ]; then mapfile -t -O "${#env_lines[@]}" env_lines < <(grep -vE '^[[:space:]]*(#|$)' "$f"); fi
done
for line in "${env_lines[@]}"; do
  ! unsafe "$line" || die "${line%%=*} contains \$, \`, \" or \\, which DeepSpeed's pdsh command cannot pass on"
done
sum=$(printf '%s\n' "${env_lines[@]}" | md5sum | cut -c1-12)
export DS_ENV_FILE="${TMPDIR:-/tmp}/mfrnet_ds_env.u$(id -u).$sum"
[ -f "$DS_ENV_FILE" ] || { printf '%s\n' "${env_lines[@]}" > "$DS_ENV_FILE.$$" && mv -f "$DS_ENV_FILE.$$" "$DS_ENV_FILE"; }

echo "launch/multinode_ssh.sh: hosts from $HOSTFILE, master $MASTER_ADDR:$MASTER_PORT," \
  "interface ${GLOO_SOCKET_IFNAME:-gloo default}, env file $DS_ENV_FILE" >&2
python launch/build_ops.py || die "could not build DeepSpeed's CPU op (output above)"

args=(--hostfile "$HOSTFILE" --launcher pdsh --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
[ -z "${NUM_NODES:-}" ] || args+=(--num_nodes "$NUM_NODES")
command -v python3 >/dev/null || die "python3 not found: it starts launch/ds_run.py"
exec python3 launch/ds_run.py "$DEEPSPEED" "${args[@]}" launch/train.py "$@"
