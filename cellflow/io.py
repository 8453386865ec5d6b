"""Atomic file output: a killed job leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
    try:
        yield Path(temporary)
        # again: a writer may have replaced the file (safetensors writes 0600 files)
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _write_with(path: str | Path, write: Callable[[Path], None]) -> None:
    with atomic_path(path) as temporary:
        write(temporary)


def write_text(path: str | Path, text: str) -> None:
    _write_with(path, lambda tmp: tmp.write_text(text))


def write_table(path: str | Path, table: pd.DataFrame) -> None:
    """Write a table without the index: comma-separated for .csv, tab-separated otherwise."""
    separator = "," if Path(path).suffix == ".csv" else "\t"
    _write_with(path, lambda tmp: table.to_csv(tmp, sep=separator, index=False))


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a tab-separated results table; only empty cells are missing values."""
    return pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""])


def save_png(path: str | Path, image: np.ndarray | Image.Image) -> None:
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    # Level 1: tissue texture barely compresses; level 6 takes ~4x the time to save ~15%.
    _write_with(path, lambda tmp: picture.save(tmp, format="PNG", compress_level=1))


def replace_dir(staged: Path, final: Path) -> None:
    """Put a fully written directory in place of ``final``, removing what was there."""
    if final.exists():
        retired = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, retired)
        os.replace(staged, final)
        shutil.rmtree(retired)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)


@contextmanager
def staged_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside ``final`` that replaces it only if the block succeeds.

    A failed or killed run leaves ``final`` as it was (a previous result, or nothing); the
    staging folders a killed run could not remove are removed by the next one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
    os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes 0700: shared group storage needs umask
    try:
        yield staging
        replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
