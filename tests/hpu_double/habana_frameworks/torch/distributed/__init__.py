from _hpu_double import record_import

record_import(__name__)
