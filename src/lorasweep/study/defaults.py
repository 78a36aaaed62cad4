"""Fault-tolerance defaults, in a module light enough for `lorasweep --help` to read."""

STORAGE_ENV = "LORASWEEP_STORAGE"  # the storage URL with its password, for workers started here
DEFAULT_PATIENCE_SECONDS = 600.0  # how long a worker waits for an unreachable storage
DEFAULT_LEASE_SECONDS = 180.0  # a running trial whose heartbeat is older than this is presumed dead
DEFAULT_MAX_ATTEMPTS = 3  # runs of one trial lost to dead workers before it is marked failed
