"""The mini world: prompt grammar, renderer, bitmap font, exact detectors and exact scorers (docs/mini_world.md).

Import the submodules directly (``flowopd.world.grammar``, ``.render``, ``.detect``, ``.scorers``).
"""
