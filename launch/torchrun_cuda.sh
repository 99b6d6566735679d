#!/usr/bin/env bash
# Launch `gaudi-pretrain train` on NVIDIA GPUs (or CPU ranks) with torchrun.
#
#   launch/torchrun_cuda.sh [--nproc-per-node N] [--nnodes M --node-rank R --master-addr A] [--master-port P]
#                           [--dry-run] -- <train args, e.g. --config configs/bridgetower_large.yaml>
#
# N defaults to the visible GPU count (nvidia-smi), else 1. Multi-node: run it on every node with the same
# --master-addr (node 0) and its own --node-rank.
set -euo pipefail

die() { echo "torchrun_cuda.sh: $*" >&2; exit 2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nproc=""
nnodes=1
node_rank=0
master_addr="${MASTER_ADDR:-127.0.0.1}"
master_port="${MASTER_PORT:-29500}"
dry_run=0

while [[ $# -gt 0 ]]; do
    case "$1" in
        --nproc-per-node) nproc="${2:?--nproc-per-node needs a value}"; shift 2 ;;
        --nnodes) nnodes="${2:?--nnodes needs a value}"; shift 2 ;;
        --node-rank) node_rank="${2:?--node-rank needs a value}"; shift 2 ;;
        --master-addr) master_addr="${2:?--master-addr needs a value}"; shift 2 ;;
        --master-port) master_port="${2:?--master-port needs a value}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (train arguments go after --)" ;;
    esac
done

if [[ -z "$nproc" ]]; then
    nproc="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [[ "$nproc" -ge 1 ]] 2>/dev/null || nproc=1
fi

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}"
cmd=(torchrun --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc"
     --master_addr "$master_addr" --master_port "$master_port"
     -m gaudi_pretrain train "$@")
if [[ "$dry_run" -eq 1 ]]; then
    printf 'DS_ACCELERATOR=%q PYTHONPATH=%q ' "$DS_ACCELERATOR" "$PYTHONPATH"
    line="$(printf '%q ' "${cmd[@]}")"
    printf '%s\n' "${line% }"
    exit 0
fi
exec "${cmd[@]}"
