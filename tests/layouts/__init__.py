"""Fabricated copies of the official dataset layouts, and what the reader tests share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cellflow.config import DatasetConfig, PrepareConfig, SplitConfig, SyntheticConfig

# the data stage's settings in the reader tests: imperfect files are excluded, not fatal
PREPARE = PrepareConfig(on_corrupt="exclude", on_small="upscale", on_duplicate="drop",
                        contact_sheet_images=4)


def dataset_config(kind: str, root: Path, classes: Sequence[str], *, name: str | None = None,
                   resolution: int = 16, test_fraction: float = 0.2,
                   options: Mapping[str, Any] | None = None) -> DatasetConfig:
    """A dataset of ``kind`` at ``root``, as a validated config entry would give it."""
    return DatasetConfig(
        name=name or kind, kind=kind, resolution=resolution, classes=tuple(classes),
        transitions=(), split=SplitConfig(val_fraction=0.2, test_fraction=test_fraction),
        synthetic=SyntheticConfig(images_per_class=4, image_size=64), root=root,
        options=dict(options or {}))


def edit_line(sheet: Path, line: int, text: str) -> None:
    """Replace line ``line`` (1-based) of a text file."""
    lines = sheet.read_text().splitlines()
    lines[line - 1] = text
    sheet.write_text("\n".join(lines) + "\n")
