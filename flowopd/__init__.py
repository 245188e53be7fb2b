"""flowopd: evaluation-first alignment of flow-matching text-to-image models (Flow-GRPO, Flow-OPD)."""

import os

__version__ = "0.1.0"

# Idle OpenMP threads wait asleep instead of spinning (read when torch loads its OpenMP runtime, so where flowopd
# is imported first: the CLIs). On a busy CPU a spinning thread burns the time slice its partner needs to finish
# the op. The threads and their shares of every op are the same, so are the results. A user's setting wins.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
