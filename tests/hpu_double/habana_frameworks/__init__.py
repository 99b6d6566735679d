"""Test double of habana_frameworks (see tests/hpu_double/README.md)."""

from _hpu_double import record_import

record_import(__name__)
