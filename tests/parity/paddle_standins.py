"""Stand-in PP-OCR inference networks (Paddle), with the real input/output contracts; imported on the Paddle side only.

paddle.jit.save converts ``forward`` from source, so the layers live at module level with module-level imports.
"""

from __future__ import annotations

from pathlib import Path

import paddle
import pyclipper  # noqa: F401  (paddle 2.6 crashes when pyclipper is imported after it)
from paddle import nn
from paddle.static import InputSpec

EN_CLASSES = 95 + 2  # en_dict.txt's 95 characters, the space (use_space_char) and the CTC blank


class Det(nn.Layer):
    """DB-style probability map (N, 1, H, W): high around dark pixels (drawn text, dark shapes), dilated."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(3, 1, 1)
        self.conv.weight.set_value(paddle.full([1, 3, 1, 1], 1.0 / 3))
        self.conv.bias.set_value(paddle.zeros([1]))

    def forward(self, x):
        dark = nn.functional.sigmoid(-6.0 * (self.conv(x) + 1.0))
        return nn.functional.max_pool2d(dark, kernel_size=7, stride=1, padding=3)  # strokes -> solid text blobs


class Rec(nn.Layer):
    """CTC recogniser (N, 3, 48, W) -> (N, W / 4, classes) probabilities; seeded, sharpened random columns."""

    def __init__(self, classes: int = EN_CLASSES):
        super().__init__()
        self.conv = nn.Conv2D(3, classes, (48, 4), stride=(48, 4))
        self.conv.weight.set_value(self.conv.weight * 60.0)  # confident: CTC scores pass drop_score (0.5)

    def forward(self, x):
        return nn.functional.softmax(self.conv(x).squeeze(2).transpose([0, 2, 1]), axis=-1)


class Cls(nn.Layer):
    """Angle classifier (N, 3, 48, 192) -> (N, 2); loaded by PaddleOCR, never called with cls=False."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2D(3, 2, (48, 192), stride=(48, 192))

    def forward(self, x):
        return nn.functional.softmax(self.conv(x).flatten(1), axis=-1)


def export(out: Path, seed: int = 0) -> dict[str, str]:
    """Write ``det``, ``rec`` and ``cls`` inference models (``inference.pdmodel`` + ``.pdiparams``) under ``out``."""
    paddle.seed(seed)
    dirs = {}
    for name, layer, spec in (("det", Det(), [None, 3, None, None]), ("rec", Rec(), [None, 3, 48, None]),
                              ("cls", Cls(), [None, 3, 48, 192])):
        layer.eval()
        dirs[name] = str(out / name)
        paddle.jit.save(layer, str(out / name / "inference"), input_spec=[InputSpec(spec, "float32")])
    return dirs
