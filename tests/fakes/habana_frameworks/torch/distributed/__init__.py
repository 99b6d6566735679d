from hpu_recorder import record_import

record_import(__name__)
