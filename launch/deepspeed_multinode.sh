#!/usr/bin/env bash
# Launch `gaudi-pretrain train` with DeepSpeed's launcher (pdsh/ssh to every host of the hostfile).
#
#   launch/deepspeed_multinode.sh [options] -- <train args, e.g. --config configs/bridgetower_large.yaml>
#
# Options:
#   --hostfile FILE      DeepSpeed hostfile, `host slots=8` per node (same format as launch/hostfile.example)
#   --nodes N            nodes to use (default: all hosts in the hostfile)
#   --cards-per-node C   devices per node (default 8)
#   --master-addr ADDR   rank-0 address (default: first host of the hostfile)
#   --master-port P      default 29500
#   --accelerator A      DS_ACCELERATOR for the launcher and ranks: hpu (default), cuda or cpu
#   --ssh-port P         sshd port of the other nodes (DeepSpeed's --ssh_port; Gaudi containers: 3022)
#   --python PY          interpreter for `gaudi-pretrain launch-env` (default: $PYTHON, else python)
#   --dry-run            write nothing, print the .deepspeed_env lines and the command, exit 0
#
# DeepSpeed's launcher forwards to other nodes only PYTHON* variables and the VAR=value lines of
# ./.deepspeed_env (deepspeed/launcher/runner.py EXPORT_ENVS; the HPU accelerator adds none), so this writes
# that file: DS_ACCELERATOR, PYTHONPATH, what the run config needs before Python starts (`gaudi-pretrain
# launch-env`: PT_HPU_LAZY_MODE), GC_KERNEL_PATH and LD_LIBRARY_PATH when set, and every PT_HPU_*, HCCL_*,
# HABANA_* variable set here. Run it from the repository root on the first node; the repository must sit
# at the same path on every node.
set -euo pipefail

die() { echo "deepspeed_multinode.sh: $*" >&2; exit 2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/launch_env.sh
source "$repo/launch/launch_env.sh"
hostfile=""
nodes=""
cards=8
master_addr="${MASTER_ADDR:-}"
master_port="${MASTER_PORT:-29500}"
accelerator="${DS_ACCELERATOR:-hpu}"
ssh_port=""
python_bin="${PYTHON:-python}"
dry_run=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --hostfile) hostfile="${2:?--hostfile needs a value}"; shift 2 ;;
        --nodes) nodes="${2:?--nodes needs a value}"; shift 2 ;;
        --cards-per-node) cards="${2:?--cards-per-node needs a value}"; shift 2 ;;
        --master-addr) master_addr="${2:?--master-addr needs a value}"; shift 2 ;;
        --master-port) master_port="${2:?--master-port needs a value}"; shift 2 ;;
        --accelerator) accelerator="${2:?--accelerator needs a value}"; shift 2 ;;
        --ssh-port) ssh_port="${2:?--ssh-port needs a value}"; shift 2 ;;
        --python) python_bin="${2:?--python needs a value}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (train arguments go after --)" ;;
    esac
done

[[ -n "$hostfile" ]] || die "--hostfile is required"
[[ -f "$hostfile" ]] || die "hostfile not found: $hostfile"
[[ -n "$nodes" ]] || nodes="$(grep -cEv '^[[:space:]]*(#|$)' "$hostfile")"
[[ -n "$master_addr" ]] || master_addr="$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")"

export DS_ACCELERATOR="$accelerator"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
env_lines=("DS_ACCELERATOR=$DS_ACCELERATOR" "PYTHONPATH=$PYTHONPATH")
launch_env "$python_bin" "$@"
names=("${LAUNCH_ENV_NAMES[@]}")
for name in "${names[@]}"; do
    env_lines+=("$name=${!name}")
done
for name in GC_KERNEL_PATH LD_LIBRARY_PATH; do
    [[ -z "${!name:-}" ]] || { env_lines+=("$name=${!name}"); names+=("$name"); }
done
while IFS= read -r name; do
    [[ " ${names[*]} " == *" $name "* ]] || env_lines+=("$name=${!name}")
done < <(compgen -e | grep -E '^(PT_HPU_|HCCL_|HABANA_)' | sort)

cmd=(deepspeed --hostfile "$hostfile" --num_nodes "$nodes" --num_gpus "$cards"
     --master_addr "$master_addr" --master_port "$master_port" --no_local_rank)
[[ -z "$ssh_port" ]] || cmd+=(--ssh_port "$ssh_port")
cmd+=(--module gaudi_pretrain train "$@")

if [[ "$dry_run" -eq 1 ]]; then
    printf '# .deepspeed_env\n'
    printf '%s\n' "${env_lines[@]}"
    line="$(printf '%q ' "${cmd[@]}")"
    printf '%s\n' "${line% }"
    exit 0
fi
printf '%s\n' "${env_lines[@]}" > .deepspeed_env
exec "${cmd[@]}"
