"""What a job cost in memory, measured where it ran."""

import resource
import sys


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark. Ray reuses worker processes, so for a
    job in a reused worker it is an upper bound on the job's own peak."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux
