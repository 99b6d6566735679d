"""Test double of habana_frameworks (see tests/fakes/README.md)."""
from hpu_recorder import record_import

record_import(__name__)
