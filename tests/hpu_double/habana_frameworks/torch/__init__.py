"""`import habana_frameworks.torch`: marks the bridge loaded, fixes the execution mode (is_lazy() is read
and cached now: the real package loads the lazy or the eager native library here), then imports core,
distributed.hccl and hpu, as gaudi-pytorch-bridge v1.19.0 python_packages/habana_frameworks/torch/__init__.py
does. With HPU_DOUBLE_TRACK=1 the device tracking mode starts here (see _hpu_double)."""

from _hpu_double import record_import, start_tracking

import habana_frameworks.autoload

habana_frameworks.autoload.is_loaded = True
record_import(__name__)

from habana_frameworks.torch.utils.internal import is_lazy  # noqa: E402

is_lazy()

import habana_frameworks.torch.core  # noqa: E402,F401
import habana_frameworks.torch.distributed.hccl  # noqa: E402,F401
import habana_frameworks.torch.hpu  # noqa: E402,F401

start_tracking()
