#!/usr/bin/env bash
# Launch `gaudi-pretrain train` on Gaudi with Open MPI: one rank per card, ranks pinned to cores.
#
#   launch/mpirun_gaudi.sh [options] -- <train args, e.g. --config configs/bridgetower_large.yaml>
#
# Options:
#   --nodes N                 nodes (default 1); N > 1 needs --hostfile
#   --cards-per-node C        ranks per node = Gaudi cards per node (default 8)
#   --hostfile FILE           Open MPI hostfile, one `host slots=C` line per node (see launch/hostfile.example)
#   --master-addr ADDR        rank-0 address (default: $MASTER_ADDR, else the first hostfile host, else 127.0.0.1)
#   --master-port P           rendezvous port (default: $MASTER_PORT, else 29500)
#   --ifname NIC              HCCL_SOCKET_IFNAME for host-NIC traffic (e.g. ens1f0)
#   --cores-per-socket N      physical cores per socket (default: from lscpu)
#   --sockets N               sockets per node (default: from lscpu)
#   --python PY               interpreter on every node (default: $PYTHON, else python)
#   --no-bind                 no core binding (--bind-to none --oversubscribe): CPU smoke runs on boxes or
#                             containers with fewer physical cores than ranks; never for Gaudi training
#   --dry-run                 print the command and exit 0
#
# Each rank gets PE = cores-per-socket / (ranks per socket) physical cores (`--map-by socket:PE=...`),
# which feeds the data-loader workers. Exported to every rank: MASTER_ADDR, MASTER_PORT, PT_HPU_LAZY_MODE,
# PYTHONPATH, HCCL_SOCKET_IFNAME (when set) and every PT_HPU_*, HCCL_*, HABANA_* variable set here.
# PT_HPU_LAZY_MODE defaults to 1 here; the run config's backend.hpu_lazy_mode still decides in-process.
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "mpirun_gaudi.sh: $*" >&2; exit 2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nodes=1
cards=8
hostfile=""
master_addr="${MASTER_ADDR:-}"
master_port="${MASTER_PORT:-29500}"
ifname="${HCCL_SOCKET_IFNAME:-}"
cores_per_socket=""
sockets=""
python_bin="${PYTHON:-python}"
dry_run=0
bind=1

while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) nodes="${2:?--nodes needs a value}"; shift 2 ;;
        --cards-per-node) cards="${2:?--cards-per-node needs a value}"; shift 2 ;;
        --hostfile) hostfile="${2:?--hostfile needs a value}"; shift 2 ;;
        --master-addr) master_addr="${2:?--master-addr needs a value}"; shift 2 ;;
        --master-port) master_port="${2:?--master-port needs a value}"; shift 2 ;;
        --ifname) ifname="${2:?--ifname needs a value}"; shift 2 ;;
        --cores-per-socket) cores_per_socket="${2:?--cores-per-socket needs a value}"; shift 2 ;;
        --sockets) sockets="${2:?--sockets needs a value}"; shift 2 ;;
        --python) python_bin="${2:?--python needs a value}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --no-bind) bind=0; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (train arguments go after --)" ;;
    esac
done

for pair in "nodes:$nodes" "cards-per-node:$cards" "master-port:$master_port"; do
    [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || die "--${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
if [[ "$nodes" -gt 1 && -z "$hostfile" ]]; then
    die "--nodes $nodes needs --hostfile (one 'host slots=$cards' line per node)"
fi
if [[ -n "$hostfile" && ! -f "$hostfile" ]]; then
    die "hostfile not found: $hostfile"
fi
if [[ -z "$master_addr" ]]; then
    if [[ -n "$hostfile" ]]; then
        master_addr="$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")"
        [[ -n "$master_addr" ]] || die "no host in $hostfile and no --master-addr"
    else
        master_addr="127.0.0.1"
    fi
fi

# Physical cores per socket and sockets: flags win, else lscpu.
if [[ -z "$cores_per_socket" || -z "$sockets" ]]; then
    command -v lscpu >/dev/null || die "lscpu not found: pass --cores-per-socket and --sockets"
    lscpu_out="$(LC_ALL=C lscpu)"
    [[ -n "$cores_per_socket" ]] || cores_per_socket="$(awk -F: '/^Core\(s\) per socket/ {gsub(/ /, "", $2); print $2}' <<<"$lscpu_out")"
    [[ -n "$sockets" ]] || sockets="$(awk -F: '/^Socket\(s\)/ {gsub(/ /, "", $2); print $2}' <<<"$lscpu_out")"
fi
[[ "$cores_per_socket" =~ ^[1-9][0-9]*$ && "$sockets" =~ ^[1-9][0-9]*$ ]] ||
    die "could not determine cores per socket / sockets (got '$cores_per_socket' / '$sockets'): pass the flags"
ranks_per_socket=$(( (cards + sockets - 1) / sockets ))
pe=$(( cores_per_socket / ranks_per_socket ))
[[ "$pe" -ge 1 ]] || pe=1
world=$(( nodes * cards ))

export MASTER_ADDR="$master_addr"
export MASTER_PORT="$master_port"
export PT_HPU_LAZY_MODE="${PT_HPU_LAZY_MODE:-1}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exports=(MASTER_ADDR MASTER_PORT PT_HPU_LAZY_MODE PYTHONPATH)
if [[ -n "$ifname" ]]; then
    export HCCL_SOCKET_IFNAME="$ifname"
    exports+=(HCCL_SOCKET_IFNAME)
fi
while IFS= read -r name; do
    [[ " ${exports[*]} " == *" $name "* ]] || exports+=("$name")
done < <(compgen -e | grep -E '^(PT_HPU_|HCCL_|HABANA_)' | sort)

cmd=(mpirun -n "$world")
[[ -z "$hostfile" ]] || cmd+=(--hostfile "$hostfile")
if [[ "$bind" -eq 1 ]]; then
    cmd+=(--bind-to core --map-by "socket:PE=$pe" --rank-by slot --report-bindings)
else
    cmd+=(--bind-to none --oversubscribe)
fi
[[ "$(id -u)" -ne 0 ]] || cmd+=(--allow-run-as-root)
for name in "${exports[@]}"; do
    cmd+=(-x "$name")
done
cmd+=("$python_bin" -m gaudi_pretrain train "$@")

if [[ "$dry_run" -eq 1 ]]; then
    for name in "${exports[@]}"; do
        printf '%s=%q ' "$name" "${!name}"
    done
    line="$(printf '%q ' "${cmd[@]}")"
    printf '%s\n' "${line% }"
    exit 0
fi
exec "${cmd[@]}"
