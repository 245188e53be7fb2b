"""The shared trainer runtime (flowopd.train.runtime) in isolation: the statistics gathered over processes, the
thread setting, the recipe's imports. Checkpoints, resume, logs and evaluation run end to end in the trainers'
tests (tests/test_grpo.py, test_opd.py, test_sft.py, test_train_resume.py)."""

from __future__ import annotations

import pytest
import torch

from flowopd.train.config import ConfigError
from flowopd.train.runtime import gather_stats, import_modules, mean_grad_norm, torch_threads


class _TwoProcesses:
    """accelerate's gather, as if a second process had reported ``other`` for every statistic."""

    device = torch.device("cpu")

    def __init__(self, other: float) -> None:
        self.other = other

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, torch.full_like(t, self.other)])


def test_statistics_are_means_over_processes_and_the_ratio_extremes_are_extremes():
    collected = {"loss": [torch.tensor(1.0), torch.tensor(3.0)], "ratio_min": [torch.tensor(0.9), torch.tensor(0.8)],
                 "ratio_max": [torch.tensor(1.1), torch.tensor(1.2)]}
    out = gather_stats(_TwoProcesses(other=0.5), collected)
    assert out == pytest.approx({"train/loss": (2.0 + 0.5) / 2, "train/ratio_min": 0.5, "train/ratio_max": 1.2})
    assert mean_grad_norm([]) == {}
    assert mean_grad_norm([torch.tensor(1.0), 3.0]) == {"train/grad_norm": 2.0}


def test_torch_threads_are_restored_also_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before
    with torch_threads(0):  # 0: left as they are
        assert torch.get_num_threads() == before


def test_an_import_that_is_not_found_names_the_module():
    with pytest.raises(ConfigError, match="imports: cannot import 'no_such_module_here'"):
        import_modules(["no_such_module_here"])
