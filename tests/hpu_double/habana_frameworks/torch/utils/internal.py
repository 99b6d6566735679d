"""`is_lazy()`: the execution mode, read once from PT_HPU_LAZY_MODE and cached (gaudi-pytorch-bridge v1.19.0
python_packages/habana_frameworks/torch/utils/internal.py; unset = eager since 1.21, see autoload)."""

import os


def is_lazy() -> bool:
    if is_lazy.cached is None:
        is_lazy.cached = os.getenv("PT_HPU_LAZY_MODE", "0") != "0"
    return is_lazy.cached


is_lazy.cached = None


def lazy_only(func):
    """Lazy-mode-only functions become no-ops in eager mode, decided at import (as the real decorator)."""
    if is_lazy():
        return func

    def noop(*args, **kwargs):
        return None

    noop.__name__ = func.__name__
    return noop
