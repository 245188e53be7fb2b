"""``torchrun ... tests/_evaluate_killer.py BENCHMARK EVALUATE-ARGS...``: ``python -m flowopd.bench evaluate``, except
that the process of rank 1 kills itself (SIGKILL, no clean-up) right after saving its first image of BENCHMARK.

torchrun then stops the other process, as it does when any worker dies: an interrupted multi-process run.
"""

import os
import signal
import sys

import flowopd.bench.images as images
from flowopd.bench.cli import main

target = sys.argv[1]
real_save_png = images.save_png


def save_png_then_die(image, path):
    real_save_png(image, path)
    if os.environ.get("RANK") == "1" and f"{os.sep}{target}{os.sep}" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)


images.save_png = save_png_then_die
sys.exit(main(["evaluate", *sys.argv[2:]]))
