"""The dataset kinds: one reader per official on-disk layout, behind one registry.

``datasets.<name>.kind`` names an entry here. The config schema's enum, the config check
(class names a kind knows, its options), the data stage, the Snakemake rules (which files
are a dataset's annotations) and ``cellflow doctor`` all read this registry, so a new
official layout is one module and one entry. Every reader reads the files exactly as the
download unpacks them (``shared/reference/dataset-formats.md``) and returns a
:class:`~cellflow.datasets.common.Listing`; the checks, resizing and splitting that follow
are the same for all.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from cellflow.datasets.common import DataError, DatasetKind, Listing, RawImage

__all__ = ["KINDS", "DataError", "DatasetKind", "Listing", "RawImage", "kind"]


def _registry() -> Mapping[str, DatasetKind]:
    from cellflow.datasets import (
        aml,
        bci,
        breastpathq,
        chaoyang,
        cpia,
        folder,
        gleason2019,
        mhist,
        prcc,
    )

    kinds = (
        folder.SYNTHETIC,
        folder.FOLDER,
        mhist.KIND,
        chaoyang.KIND,
        bci.KIND,
        aml.KIND,
        prcc.KIND,
        breastpathq.KIND,
        gleason2019.KIND,
        cpia.KIND,
    )
    return MappingProxyType({entry.name: entry for entry in kinds})


KINDS: Mapping[str, DatasetKind] = _registry()


def kind(name: str) -> DatasetKind:
    try:
        return KINDS[name]
    except KeyError:
        raise DataError(f"unknown dataset kind '{name}'; known: {', '.join(KINDS)}") from None
