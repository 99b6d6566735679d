#!/usr/bin/env bash
# Sourced by the launchers: export what the run config needs before Python starts.
#
#   launch_env PYTHON TRAIN_ARGS...   exports each NAME=value `gaudi-pretrain launch-env` prints (the Gaudi
#                                     bridge reads PT_HPU_LAZY_MODE when torch is first imported) and lists
#                                     the names in LAUNCH_ENV_NAMES; a different value already exported is
#                                     refused (the config decides); a bad config stops the launcher (exit 2).

launch_env() {
    local python_bin="$1" lines name value
    shift
    LAUNCH_ENV_NAMES=()
    lines="$("$python_bin" -m gaudi_pretrain launch-env "$@")" || exit 2
    while IFS='=' read -r name value; do
        [[ -n "$name" ]] || continue
        if [[ -n "${!name:-}" && "${!name}" != "$value" ]]; then
            echo "$(basename "$0"): $name=${!name} is exported here but the run config needs $name=$value" \
                "(unset it, or change the config)" >&2
            exit 2
        fi
        export "$name=$value"
        LAUNCH_ENV_NAMES+=("$name")
    done <<<"$lines"
}
