#!/usr/bin/env bash
# Run `gaudi-pretrain train` as one process (one card; the Docker image's default command), with the
# environment its config needs before Python starts exported first (`gaudi-pretrain launch-env`:
# PT_HPU_LAZY_MODE, which the Gaudi bridge reads when torch is first imported).
#
#   launch/run.sh [--python PY] [--dry-run] -- <train args, e.g. --config /config/run.yaml>
set -euo pipefail

die() { echo "run.sh: $*" >&2; exit 2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/launch_env.sh
source "$repo/launch/launch_env.sh"
python_bin="${PYTHON:-python}"
dry_run=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) python_bin="${2:?--python needs a value}"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (train arguments go after --)" ;;
    esac
done

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
launch_env "$python_bin" "$@"
exported=()
for name in "${LAUNCH_ENV_NAMES[@]}"; do
    exported+=("$name=${!name}")
done
cmd=("$python_bin" -m gaudi_pretrain train "$@")
if [[ "$dry_run" -eq 1 ]]; then
    line="$(printf '%q ' "${exported[@]}" "${cmd[@]}")"
    printf '%s\n' "${line% }"
    exit 0
fi
exec "${cmd[@]}"
