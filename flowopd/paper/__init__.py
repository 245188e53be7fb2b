"""The paper's tables and seesaw figure, and the training recipes they run (``python -m flowopd.paper``).

The top floor: it evaluates through :mod:`flowopd.bench` and trains through :mod:`flowopd.train`, and
nothing below imports it.
"""
