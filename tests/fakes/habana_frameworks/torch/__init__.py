from hpu_recorder import record_import

record_import(__name__)

from habana_frameworks.torch import hpu  # noqa: E402,F401  (the real package exposes htorch.hpu)
