"""torch's device-backend autoload entry point (`import torch` calls `__autoload`).

Modelled on HabanaAI/gaudi-pytorch-bridge python_packages/habana_frameworks/autoload/__init__.py: the
bridge loads unless PT_HPU_AUTOLOAD=0, and, when PT_HPU_AUTOLOAD is unset, not in lazy mode. In the
v1.19.0 source lazy mode is the default ("1"); since 1.21 eager is (docs.habana.ai "Runtime Environment
Variables": PT_HPU_LAZY_MODE default 0; HabanaAI/Gaudi-tutorials PR 131: "Lazy mode is no longer the
default execution mode ... since 1.21.0"), so this double, a 1.22 bridge, treats an unset variable as eager.
"""

import os

is_loaded = False


def is_autoload_enabled() -> bool:
    flag = os.getenv("PT_HPU_AUTOLOAD", "-1")
    if flag in ("0", "1"):
        return flag == "1"
    return os.getenv("PT_HPU_LAZY_MODE", "0") != "1"


def __autoload():
    if is_loaded or not is_autoload_enabled():
        return
    import habana_frameworks.torch  # noqa: F401
