"""The environment that must exist before torch is imported.

Since Gaudi software 1.18, `import torch` loads the Gaudi bridge by itself (torch's device-backend
autoload), and the bridge reads PT_HPU_LAZY_MODE once, then. The launchers export these variables from the
run config (`gaudi-pretrain launch-env`); `train` sets what is missing before its first `import torch`, so
a direct `python -m gaudi_pretrain train` works too, and refuses a value that contradicts the config.
"""

from __future__ import annotations

import os
import sys

from gaudi_pretrain.config import BackendConfig
from gaudi_pretrain.distributed import DistInfo, discover, export_env
from gaudi_pretrain.errors import ConfigError


def apply(cfg: BackendConfig, can_set: bool = True) -> None:
    """Set the config's launch variables that are unset (when `can_set`: the bridge is not loaded yet);
    a variable already set to another value is a ConfigError naming both."""
    for name, wanted in cfg.launch_environment().items():
        have = os.environ.get(name)
        if have is None and can_set:
            os.environ[name] = wanted
        elif have is not None and have != wanted:
            raise ConfigError(
                f"{name}={have} was set before Python started but the config needs {name}={wanted} "
                "(backend.hpu_lazy_mode): unset it, or change the config (launch/*.sh export it from the config)"
            )


def prepare(cfg: BackendConfig) -> DistInfo:
    """Before the process imports torch: who we are (the launcher's rank variables, and the rendezvous
    address) and the config's launch variables go into the environment. torch loads the Gaudi bridge on
    import, and its hccl module fills RANK / MASTER_ADDR=localhost / HLS_MODULE_ID from what it finds then
    (gaudi-pytorch-bridge v1.19.0, python_packages/.../torch/distributed/hccl/__init__.py,
    `initialize_distributed_hpu()` at import; modelled by tests/hpu_double). Harmless when torch is already
    imported: the backend checks the bridge's mode."""
    info = discover()
    export_env(info)
    apply(cfg, can_set="torch" not in sys.modules)
    return info
