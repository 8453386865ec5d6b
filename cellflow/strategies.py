"""The augmentation strategies of the downstream benchmark, as one registry.

Each strategy is a name in ``downstream.strategies`` with the defaults of its paper, so a
config entry ``mixup: {}`` means "mixup as published" and every override is explicit. There
are three kinds:

* ``basic``: only the basic augmentation (flips, 90-degree turns, mild colour jitter), which
  every strategy applies first, so that the others differ from ``none`` by one thing only;
* ``spatial``: a batch-level operation after the basic one (cutout and the mixing methods,
  :mod:`cellflow.augment`);
* ``generative``: generated images join the training set (``ratio`` per real image); every
  generation method (:mod:`cellflow.generation`) is one, and so is an external generator
  (``generation.external``). The downstream trainer adds the images.

The registry imports nothing heavy: the config check reads it when the workflow parses.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cellflow.generation import METHODS as GENERATION_METHODS

__all__ = ["STRATEGIES", "Strategy", "generative_strategy", "resolve_params", "strategy"]


@dataclass(frozen=True)
class Strategy:
    name: str
    kind: str  # "basic" | "spatial" | "generative"
    defaults: Mapping[str, Any]  # documented defaults from the paper
    reference: str  # paper, one line


def _strategy(name: str, kind: str, reference: str, **defaults: Any) -> Strategy:
    return Strategy(name, kind, MappingProxyType(defaults), reference)


_GENERATIVE_RATIO = 1.0  # generated images per real training image

STRATEGIES: Mapping[str, Strategy] = MappingProxyType({s.name: s for s in (
    _strategy("none", "basic", "Tellez et al. 2019, Med. Image Anal. 58:101544, "
              "arXiv:1902.06543 (flips, rotations, colour jitter)"),
    # 16-px holes on 32-px CIFAR images; applied to every image.
    _strategy("cutout", "spatial", "DeVries & Taylor 2017, arXiv:1708.04552",
              size_fraction=0.5, prob=1.0),
    # alpha 0.2 is the paper's ImageNet setting (CIFAR used 1.0).
    _strategy("mixup", "spatial", "Zhang et al. 2018 (ICLR), arXiv:1710.09412",
              alpha=0.2, prob=1.0),
    # Beta(1, 1) and cutmix_prob 1.0 are the official ImageNet settings (CIFAR used 0.5).
    _strategy("cutmix", "spatial", "Yun et al. 2019 (ICCV), arXiv:1905.04899",
              alpha=1.0, prob=1.0),
    # The official FMix defaults: alpha 1, decay power 3, binary masks, every batch.
    _strategy("fmix", "spatial", "Harris et al. 2020, arXiv:2002.12047",
              alpha=1.0, decay_power=3.0, prob=1.0),
    # tau ~ U(0.1, 0.8) as in the paper; applied to every batch.
    _strategy("resizemix", "spatial", "Qin et al. 2020, arXiv:2012.11101",
              alpha=0.1, beta=0.8, prob=1.0),
    # Beta(1, 1) and salmix_prob 1.0 are the official ImageNet settings (CIFAR used 0.5).
    _strategy("saliencymix", "spatial", "Uddin et al. 2021 (ICLR), arXiv:2006.01791",
              alpha=1.0, prob=1.0),
    # every generation method is a strategy: its images join the real training split
    *(_strategy(name, "generative", f"{method.summary}: {method.reference}",
                ratio=_GENERATIVE_RATIO) for name, method in GENERATION_METHODS.items()),
)})


def generative_strategy(name: str, reference: str) -> Strategy:
    """The strategy of a generation method outside the registry (``generation.external``)."""
    return _strategy(name, "generative", reference, ratio=_GENERATIVE_RATIO)


def strategy(name: str, generated: bool = False) -> Strategy:
    """A registered strategy; with ``generated`` (a folder of generated images comes with it)
    an unregistered name is an external generator's."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    if generated:
        return generative_strategy(name, "external generator (generation.external)")
    raise ValueError(f"unknown augmentation strategy '{name}'; valid names: "
                     f"{', '.join(sorted(STRATEGIES))}")


def resolve_params(name: str, overrides: Mapping[str, Any] | None, generated: bool = False
                   ) -> dict[str, Any]:
    """The paper's defaults updated by ``overrides``; an unknown key is refused, not ignored.

    A misspelt key silently falling back to the default would benchmark the wrong setting.
    """
    defaults = strategy(name, generated).defaults
    unknown = sorted(set(overrides or {}) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise ValueError(f"unknown parameter(s) {', '.join(repr(k) for k in unknown)} for "
                         f"strategy '{name}'; allowed: {allowed}")
    return {**defaults, **(overrides or {})}


