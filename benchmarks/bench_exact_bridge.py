"""The stair bridge on exact models: what each bridge option gives when nothing is learnt.

Gaussian H&E-like classes (``cellflow.exact``) in pixel space with closed-form epsilon and
p(y | x_t) replace the UNet and the classifier; ``StairBridge`` runs unchanged. For every
design (``fine``: the classes differ in low-variance nuclei detail; ``coarse``: along the
highest-variance staining direction), timestep spacing, stair rule, Fourier band and classifier
scale it reports, over the trajectories of ``--sources`` source images:

- ``within 0.15``: share of trajectories whose every frame i has |p(target) - i/N| <= 0.15;
- ``p monotone`` / ``lambda monotone``: share whose exact posterior / position between the
  class means never goes back (frame 0 = the source);
- ``p first``, ``p last``: median exact p(target) of frames 1 and N;
- ``max |p - i/N|``, ``max p step``: median over trajectories of the largest deviation from
  even posteriors and of the largest rise between consecutive frames (frame 0 included);
- ``lambda last``: median position of frame N (0 = source mean, 1 = target mean);
- ``fallback``: share of trajectories on the reference's even fallback stairs;
- ``UNet/traj``: UNet evaluations per trajectory (reference: K + sum of stairs).

Targets (reported, never tuned to): fine design, posterior stairs: within 0.15 for every
frame and monotone in >= 95% of trajectories.

    python -m benchmarks.bench_exact_bridge [--resolution 32] [--sources 32]
        (appends to benchmarks/results/exact_bridge.md, per-trajectory rows to
         benchmarks/results/exact_bridge.tsv)
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import pandas as pd
import torch

from benchmarks.machine import RESULTS, record
from cellflow.bridge import BridgeConfig, StairBridge
from cellflow.diffusion import NoiseSchedule
from cellflow.exact import (
    DESIGNS,
    ExactClassifier,
    ExactEpsilon,
    gaussian_design,
    score_trajectories,
)

# The option grid: every stair rule and scale on both spacings; the Fourier band matters to
# the Fourier rule only.
SPACINGS = ("uniform", "quadratic")
RULES = (("fourier", "reference"), ("fourier", "scaled"), ("posterior", "reference"))
SCALES = (0.0, 1.0, 2.0)


def run(resolution: int, sources: int, steps: int, frames: int, seed: int
        ) -> tuple[list[dict], pd.DataFrame]:
    schedule = NoiseSchedule()
    alphas = schedule.ddpm().alphas_cumprod
    summary, trajectories = [], []
    for design in DESIGNS:
        model = gaussian_design(design, resolution, alphas, seed=seed)
        images = model.sample(0, sources, torch.Generator().manual_seed(seed))
        source_labels = torch.zeros(sources, dtype=torch.long)
        target_labels = torch.ones(sources, dtype=torch.long)
        for spacing, (rule, band), scale in itertools.product(SPACINGS, RULES, SCALES):
            config = BridgeConfig(inversion_steps=steps, frames=frames, classifier_scale=scale,
                                  timestep_spacing=spacing, stair_selection=rule,
                                  fourier_band=band, max_rows_per_call=4 * sources)
            bridge = StairBridge(ExactEpsilon(model), ExactClassifier(model), schedule, config)
            result = bridge.trajectories(images, source_labels, target_labels)
            scores = pd.DataFrame(score_trajectories(model, images, result.frames, 0, 1))
            options = {"design": design, "spacing": spacing, "stairs": rule, "band": band,
                       "scale": scale}
            scores = scores.assign(**options, stair_list=[list(map(int, s))
                                                          for s in result.stairs],
                                   stair_rule=result.stair_rule)
            trajectories.append(scores)
            summary.append({
                **options,
                "within 0.15": f"{scores['posterior_within_tolerance'].mean():.2f}",
                "p monotone": f"{scores['posterior_monotone'].mean():.2f}",
                "lambda monotone": f"{scores['position_monotone'].mean():.2f}",
                "p first": f"{scores['posterior_first'].median():.2f}",
                "p last": f"{scores['posterior_last'].median():.2f}",
                "max |p - i/N|": f"{scores['posterior_max_deviation'].median():.2f}",
                "max p step": f"{scores['posterior_max_step'].median():.2f}",
                "lambda first": f"{scores['position_first'].median():.2f}",
                "lambda last": f"{scores['position_last'].median():.2f}",
                "fallback": f"{np.mean([r.endswith('fallback') for r in result.stair_rule]):.2f}",
                "median stairs": str(np.median(result.stairs, axis=0).astype(int).tolist()),
                "UNet/traj": f"{result.counter.unet_evaluations / sources:.0f}",
            })
    return summary, pd.concat(trajectories, ignore_index=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--sources", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    summary, trajectories = run(args.resolution, args.sources, args.steps, args.frames,
                                args.seed)
    record("exact_bridge",
           f"Stair bridge on exact Gaussian models ({args.resolution} px, K={args.steps}, "
           f"N={args.frames}, {args.sources} sources per design, float64)", summary)
    trajectories.to_csv(RESULTS / "exact_bridge.tsv", sep="\t", index=False)


if __name__ == "__main__":
    main()
