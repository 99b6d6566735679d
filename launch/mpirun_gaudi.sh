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
#   --ifname NIC              HCCL_SOCKET_IFNAME: the NIC of HCCL's side-channel TCP (e.g. ens1f0)
#   --tcp-if IF|CIDR          Open MPI's own TCP traffic on this interface / subnet (--mca btl_tcp_if_include)
#   --ssh-port P              sshd port of the other nodes (--mca plm_rsh_args "-p P"; Gaudi containers: 3022)
#   --host-nic                scale-out over host NICs with libfabric: -x RDMAV_FORK_SAFE=1 -x FI_EFA_USE_DEVICE_RDMA=1
#   --ompi-major N            Open MPI major version (default: from `mpirun --version`; 5 in Gaudi 1.23 images)
#   --cores-per-socket N      physical cores per socket (default: from lscpu)
#   --sockets N               sockets per node (default: from lscpu)
#   --python PY               interpreter on every node (default: $PYTHON, else python)
#   --no-bind                 no core binding (--bind-to none --oversubscribe): CPU smoke runs on boxes or
#                             containers with fewer physical cores than ranks; never for Gaudi training
#   --dry-run                 print the command and exit 0
#
# Each rank gets PE = cores-per-socket / (ranks per socket) physical cores (`--map-by socket:PE=...`, across
# nodes `ppr:<ranks per socket>:socket:PE=...`), which feeds the data-loader workers. The environment the
# run config needs before Python starts (PT_HPU_LAZY_MODE: the Gaudi bridge reads it when torch is first
# imported) comes from `gaudi-pretrain launch-env <train args>`. Exported to every rank: MASTER_ADDR,
# MASTER_PORT, PYTHONPATH, that environment, GC_KERNEL_PATH and LD_LIBRARY_PATH when set, and every
# PT_HPU_*, HCCL_*, HABANA_* variable set here.
set -euo pipefail

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "mpirun_gaudi.sh: $*" >&2; exit 2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/launch_env.sh
source "$repo/launch/launch_env.sh"
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
tcp_if=""
ssh_port=""
host_nic=0
ompi_major=""

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
        --tcp-if) tcp_if="${2:?--tcp-if needs a value}"; shift 2 ;;
        --ssh-port) ssh_port="${2:?--ssh-port needs a value}"; shift 2 ;;
        --host-nic) host_nic=1; shift ;;
        --ompi-major) ompi_major="${2:?--ompi-major needs a value}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        --no-bind) bind=0; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (train arguments go after --)" ;;
    esac
done

for pair in "nodes:$nodes" "cards-per-node:$cards" "master-port:$master_port" ${ssh_port:+"ssh-port:$ssh_port"}; do
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
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exports=(MASTER_ADDR MASTER_PORT PYTHONPATH)
launch_env "$python_bin" "$@"
exports+=("${LAUNCH_ENV_NAMES[@]}")
if [[ -n "$ifname" ]]; then
    export HCCL_SOCKET_IFNAME="$ifname"
    exports+=(HCCL_SOCKET_IFNAME)
fi
for name in GC_KERNEL_PATH LD_LIBRARY_PATH; do  # set by the Gaudi image's profile, which remote shells skip
    [[ -z "${!name:-}" ]] || exports+=("$name")
done
if [[ "$host_nic" -eq 1 ]]; then
    export RDMAV_FORK_SAFE=1 FI_EFA_USE_DEVICE_RDMA=1
    exports+=(RDMAV_FORK_SAFE FI_EFA_USE_DEVICE_RDMA)
fi
while IFS= read -r name; do
    [[ " ${exports[*]} " == *" $name "* ]] || exports+=("$name")
done < <(compgen -e | grep -E '^(PT_HPU_|HCCL_|HABANA_)' | sort)
if [[ -z "$ompi_major" ]]; then
    ompi_major="$({ mpirun --version 2>/dev/null || true; } | sed -n 's/.*(Open MPI) \([0-9]*\)\..*/\1/p' | head -n 1)"
fi

cmd=(mpirun -n "$world")
[[ -z "$hostfile" ]] || cmd+=(--hostfile "$hostfile")
if [[ "$bind" -eq 1 && "$nodes" -gt 1 ]]; then
    cmd+=(--bind-to core --map-by "ppr:$ranks_per_socket:socket:PE=$pe" --rank-by slot --report-bindings)
elif [[ "$bind" -eq 1 ]]; then
    cmd+=(--bind-to core --map-by "socket:PE=$pe" --rank-by slot --report-bindings)
else
    cmd+=(--bind-to none --oversubscribe)
fi
if [[ "$nodes" -gt 1 ]]; then
    # Model-References 1.23 multi-node lines: remote orted found through the image's MPI_ROOT, and with
    # Open MPI 5 (the 1.23 images) --mca ras_base_launch_orted_on_hn 1 beyond 8 ranks
    [[ -z "${MPI_ROOT:-}" ]] || cmd+=(--prefix "$MPI_ROOT")
    [[ -z "$ssh_port" ]] || cmd+=(--mca plm_rsh_args "-p $ssh_port")
    [[ "${ompi_major:-0}" -lt 5 || "$world" -le 8 ]] || cmd+=(--mca ras_base_launch_orted_on_hn 1)
fi
[[ -z "$tcp_if" ]] || cmd+=(--mca btl_tcp_if_include "$tcp_if")
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
