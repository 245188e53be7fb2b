"""The probe set of the reward-hacking monitor (issue 23): on the mini world, the four Table-1 rewards of a small
fixed set of images that the current policy samples every ``monitor_probe_every`` iterations.

A run trained on one reward can raise it while the others fall (the seesaw of METHOD.md s.1) or while it learns to
please its scorer only (reward hacking). The rollouts' own rewards do not show it; the probe does, cheaply and from
the run itself: the shared runtime (:class:`flowopd.train.runtime.Run`) calls :class:`Probe` at iteration 0 of a
fresh run, every ``monitor_probe_every`` iterations and at the last one, and logs ``monitor/probe/mini-geneval``,
``monitor/probe/mini-ocr``, ``monitor/probe/mini-quality`` and ``monitor/probe/mini-pick`` (the mean score of the
probe's images) and ``time/probe_s``; ``python -m flowopd.train.diagnostics monitor RUN --out FILE.png`` plots them
beside the reward curve.

The probe set:

- prompts from the mini world's **train** split only, never the test benchmarks' prompts: ``n`` prompts evenly
  spaced through the benchmark's prompt set on the train split (the set that training/val_benchmarks/*-val.toml
  score), so that every GenEval tag appears (the train set is ordered by tag; its first 16 prompts hold only three
  of the six tags);
- one image per prompt, with the generation settings (steps, CFG, size, seed) of the benchmark's spec
  (``flowopd.bench.spec.get_spec(name).generation``) and a seed of the probe's own for every prompt
  (``sample_seed(seed, "monitor-probe/<image set>", index in the train set, 0)``), sampled by the ODE;
- the benchmarks' scorers (the spec's ``scorer`` and ``scorer_options``), in memory, no image file written;
  mini-quality and mini-pick score mini-geneval's probe images, as their specs' ``images_from`` says.

Cost: one probe of 16 + 16 prompts on the committed mini:base took 4.0 s (median of 5; 3.9-4.7 s) and, later,
6.0 s (5.2-6.3 s) on one torch thread of the 2-core development machine while two other jobs ran; at 2 threads
there it took 17-49 s (contention with those jobs). Measured with::

    python -c "import time, torch; from flowopd.models.loading import load_policy; \\
    from flowopd.train.probe import Probe; torch.set_num_threads(1); policy = load_policy('mini:base'); \\
    probe = Probe(16); t = time.perf_counter(); probe(policy); print(time.perf_counter() - t)"

It draws from no global random generator (the noise comes from one generator per seed) and changes nothing that
is trained: a run gives the same adapter with the probe on or off (tests/test_monitor_probe.py). SD3.5-M runs have
no probe (their scorers are models, too costly to run inside training): their ``eval_every`` / ``eval_benchmarks``
evaluate instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flowopd.bench.images import sample_seed
from flowopd.bench.spec import BenchmarkSpec, GenerationSpec, all_specs, get_spec
from flowopd.data import load_prompts
from flowopd.sampling import sample_ode
from flowopd.scorers import build_scorer
from flowopd.scorers.base import Scorer
from flowopd.train.config import ConfigError

#: Table 1's four mini benchmarks (flowopd.bench.evaluate.MINI_DEFAULT_BENCHMARKS), each logged as monitor/probe/NAME
PROBE_BENCHMARKS = ("mini-geneval", "mini-ocr", "mini-quality", "mini-pick")
PROBE_SPLIT = "train"
METRIC_PREFIX = "monitor/probe/"


def probe_indices(total: int, n: int) -> list[int]:
    """``n`` indices evenly spaced through ``range(total)`` (``i * total // n``), starting at 0."""
    if not 1 <= n <= total:
        raise ValueError(f"cannot take {n} of {total} prompts")
    return [i * total // n for i in range(n)]


@dataclass(frozen=True)
class ProbeImageSet:
    """The images of one benchmark's probe (several benchmarks may score them)."""

    name: str  # the benchmark whose prompts and generation settings make them
    indices: list[int]  # positions of the prompts in the train-split prompt set
    prompts: list[dict[str, Any]]
    generation: GenerationSpec

    @property
    def seeds(self) -> list[int]:
        """One seed per image, the probe's own (an evaluation's image set of the same prompts has others)."""
        return [sample_seed(self.generation.seed, f"monitor-probe/{self.name}", i, 0) for i in self.indices]


def train_prompts(spec: BenchmarkSpec) -> list[dict[str, Any]]:
    """The benchmark's prompt set on the mini world's train split: its spec's ``[prompts]`` with ``split`` set to
    ``"train"`` (what training/val_benchmarks/*-val.toml load)."""
    prompts = spec.prompts
    if "split" not in prompts.args:
        raise ValueError(f"{spec.name}: its prompt set has no split to take the train prompts of")
    return load_prompts(dataclasses.replace(prompts, args={**prompts.args, "split": PROBE_SPLIT}))


class Probe:
    """The probe set of :data:`PROBE_BENCHMARKS` and their scorers, built once per run, with ``n_prompts``
    (``monitor_probe_prompts``) prompts per image set; calling it samples and scores with the policy as it is."""

    def __init__(self, n_prompts: int) -> None:
        self.benchmarks = list(PROBE_BENCHMARKS)
        self.owner: dict[str, str] = {}  # benchmark -> the image set it scores
        self.image_sets: dict[str, ProbeImageSet] = {}
        self.scorers: dict[str, Scorer] = {}
        specs = all_specs()  # parsed once (get_spec parses every spec file at each call)
        for name in self.benchmarks:
            spec = specs[name] if name in specs else get_spec(name)  # get_spec: the unknown name's message
            owner = spec.images_from or spec.name
            self.owner[name] = owner
            if owner not in self.image_sets:
                every = train_prompts(specs[owner])
                if n_prompts > len(every):
                    raise ConfigError(f"monitor_probe_prompts = {n_prompts}: {owner} has {len(every)} prompts on "
                                      f"the {PROBE_SPLIT} split; use at most {len(every)}")
                indices = probe_indices(len(every), n_prompts)
                self.image_sets[owner] = ProbeImageSet(owner, indices, [every[i] for i in indices],
                                                       specs[owner].generation)
            self.scorers[name] = build_scorer(spec.scorer, **spec.scorer_options)

    def sample(self, policy: Any) -> dict[str, torch.Tensor]:
        """The probe's images by image set: one ODE sample per prompt, in one batch per set, without autograd."""
        images = {}
        with torch.no_grad():
            for name, s in self.image_sets.items():
                cond = policy.encode_prompts([m["prompt"] for m in s.prompts])
                noise = policy.initial_noise(s.seeds, s.generation.height, s.generation.width)
                images[name] = sample_ode(policy, cond, noise, s.generation.steps, s.generation.guidance_scale)
        return images

    def score(self, images: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """``{monitor/probe/<benchmark>: mean score}`` of :meth:`sample`'s images."""
        out = {}
        for name in self.benchmarks:
            s = self.image_sets[self.owner[name]]
            batch = self.scorers[name].score(images[s.name], [m["prompt"] for m in s.prompts], s.prompts)
            out[METRIC_PREFIX + name] = float(np.mean(batch.scores))
        return out

    def __call__(self, policy: Any) -> dict[str, float]:
        return self.score(self.sample(policy))


def check_probe(model: str, every: int) -> None:
    """Refuse ``monitor_probe_every > 0`` for a model that is not of the mini world (a ConfigError naming the field),
    before the model loads."""
    if not every:
        return
    from flowopd.models.loading import resolve_checkpoint

    checkpoint = resolve_checkpoint(model)
    if checkpoint.named_local and not checkpoint.path.exists():
        return  # the loader refuses it, naming what it looked for
    if not checkpoint.is_mini:
        raise ConfigError(f"monitor_probe_every = {every}: the probe set scores the mini world's benchmarks, and "
                          f"model {model!r} is not a mini model; set monitor_probe_every = 0 and use eval_every / "
                          f"eval_benchmarks to follow the benchmarks at SD3.5-M scale")
