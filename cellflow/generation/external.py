"""Images made outside the pipeline, imported as a generation method (e.g. StyleGAN-XL).

A generator this project does not run itself (a GAN trained with its authors' own code, a
model behind a service) still gets the same downstream training and evaluation as the
built-in methods: its images are checked like real data, re-encoded as PNG and listed in a
manifest of :mod:`cellflow.generation.common`'s format, with hard labels. Each entry of
``generation.external`` is one such method, named by its key::

    generation:
      methods: [cellflow, ddib, adm, stylegan_xl]
      external:
        stylegan_xl:
          root: external/stylegan_xl
          reference: "Sauer et al. 2022 (SIGGRAPH), arXiv:2202.00273"

Where the images go
-------------------
``<root>/<dataset>/<class>/*.{png,jpg,jpeg,tif,tiff}``, one folder per configured class of
``datasets.<dataset>.classes``, each image at the dataset's ``resolution`` (square). When
``<root>/<dataset>/`` does not exist, ``<root>/<class>/`` is read instead (one dataset per
root). ``<root>/<dataset>/`` wins whenever it is a folder: class folders directly under
``<root>`` are then not read (a warning says so), so one root can hold several datasets.

What is checked
---------------
Each problem stops the import with a message naming the file or folder:

* every class folder is a configured class: a folder of another name is an error (it lists
  the configured classes), not silently skipped, because a misnamed folder means images
  under the wrong label; hidden folders and files are ignored;
* every configured class has a folder with at least one image;
* every image opens and decodes (a truncated or corrupt file is named);
* every image is ``resolution`` x ``resolution``. Generated images are never resized here:
  a generator that samples at another size was trained at another size, and resizing would
  compare it with the other methods at a quality it does not have. Regenerate at the
  dataset resolution (or resize the files yourself, knowingly);
* colour: as the data stage does for real images (:func:`cellflow.data.to_rgb`),
  grayscale, palette, 16-bit and RGBA images are converted to RGB (transparent pixels
  become white), with a warning and a note in ``origin.tsv``; EXIF orientation is applied.
  Files with other extensions are ignored with a warning; pixel-identical images are kept
  but counted (``duplicates`` in ``generation.json``).

What is written
---------------
Into ``<out>``, which is replaced only when the whole import succeeds:

* ``images/<class>/<method>_<class>_<nnnn>.png``: every image, re-encoded as RGB PNG,
  numbered from 0 in the order of its path within its class folder;
* ``manifest.tsv``: one row per image (method = the entry's name, source_id =
  ``<method>_<class>_<nnnn>``, source and target class = its class, labels by the order of
  ``datasets.<dataset>.classes``, frame_index 1, stair 0, timestep 0, soft_label_weight 1);
* ``origin.tsv``: each output's original file (absolute path), the sha256 of its bytes,
  and what was converted;
* ``generation.json``: method, outputs (in all and per class), the folder read, the
  reference, seconds.

Making the images with StyleGAN-XL's own code
---------------------------------------------
With autonomousvision/stylegan_xl (Sauer, Schwarz & Geiger 2022; its README and
``environment.yml``):

1. Training images: only the training split, never validation or test images. Copy the
   ``split == train`` rows of ``results/<dataset>/data/manifest.tsv`` (their ``path`` is
   relative to that folder and already at the dataset resolution) to
   ``sgxl/<dataset>/<class>/``, and write ``sgxl/<dataset>/dataset.json`` as
   ``{"labels": [["<class>/<file>.png", <label>], ...]}``, one pair per image, where
   ``<label>`` is the class's index in ``datasets.<dataset>.classes`` (the manifest's
   ``label`` column): StyleGAN's tools read class labels from ``dataset.json`` only, not
   from folder names.
2. Pack it once per training resolution: StyleGAN-XL trains a low-resolution stem, then
   super-resolution stages up to the dataset resolution ``R`` (its README suggests a 32 or
   64 px stem ``S`` and one stage straight to ``R`` when few stages are wanted)::

       python dataset_tool.py --source=sgxl/<dataset> --dest=sgxl/<dataset>S.zip \\
           --resolution=SxS --transform=center-crop
       python dataset_tool.py --source=sgxl/<dataset> --dest=sgxl/<dataset>R.zip \\
           --resolution=RxR --transform=center-crop

3. Train class-conditionally (``--cond True``; train.py refuses it without labels in
   ``dataset.json``). The README's settings for datasets under 50k images are
   ``--cbase 16384 --cmax 256 --syn_layers 7`` and ``--head_layers 4``::

       python train.py --outdir=training-runs/<dataset> --cfg=stylegan3-t \\
           --data=sgxl/<dataset>S.zip --gpus=1 --batch=64 --mirror=1 --snap 10 \\
           --kimg 10000 --cbase 16384 --cmax 256 --syn_layers 7 --cond True
       python train.py --outdir=training-runs/<dataset> --cfg=stylegan3-t \\
           --data=sgxl/<dataset>R.zip --gpus=1 --batch=64 --mirror=1 --snap 10 \\
           --kimg 10000 --cbase 16384 --cmax 256 --syn_layers 7 --cond True \\
           --superres --up_factor <R/S> --head_layers 4 \\
           --path_stem training-runs/<dataset>/<stem run>/best_model.pkl

4. Sample every class at the dataset resolution, without truncation (``--trunc 1.0``, so
   the samples keep the model's full diversity as the other methods' do), one image per
   seed (``--batch-sz 1``, the default: a larger value saves a grid per seed, which this
   import rejects for its size), into the class's folder here. For the class of index
   ``i`` in ``datasets.<dataset>.classes``::

       python gen_images.py --network=training-runs/<dataset>/<run>/best_model.pkl \\
           --class=i --trunc=1.0 --seeds=0-<N-1> --batch-sz 1 \\
           --outdir=<root>/<dataset>/<class i>

   gen_images.py names its files ``seed<nnnn>.png``; they are numbered here in the sorted
   order of their names. Then add the entry's name to ``generation.methods``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import ExifTags, Image, ImageOps

from cellflow.data import IMAGE_EXTENSIONS, DataError, to_rgb
from cellflow.generation.common import MANIFEST_COLUMNS, GenerationJob
from cellflow.io import save_png, staged_directory, write_table, write_text

log = logging.getLogger(__name__)

ORIGIN_COLUMNS = ["source_id", "path", "source_path", "sha256", "note"]
SHOWN_PROBLEMS = 20  # files named in one error; the rest are counted


@dataclass(frozen=True)
class ImportFolder:
    """The folder the images are read from and which layout it is."""

    folder: Path
    layout: str  # "<root>/<dataset>" or "<root>"


def run(job: GenerationJob) -> pd.DataFrame:
    """Import ``<root>/<dataset>/<class>/`` (or ``<root>/<class>/``) into ``job.out_dir``."""
    settings = job.settings
    if not settings.get("root"):
        raise DataError("external generation method: no root folder in its settings "
                        "(generation.external.<name>.root)")
    return import_images(
        name=str(settings.get("name") or "external"), root=Path(settings["root"]),
        dataset=job.dataset.name, classes=job.dataset.classes,
        resolution=job.dataset.resolution, out_dir=job.out_dir,
        reference=str(settings.get("reference", "")))


def import_folder(root: Path, dataset: str, classes: Sequence[str]) -> ImportFolder:
    """``<root>/<dataset>`` when it is a folder, else ``<root>`` itself."""
    if not root.is_dir():
        raise DataError(f"external images: root {root} does not exist or is not a folder "
                        f"(expected {root}/{dataset}/<class>/ or {root}/<class>/)")
    nested = root / dataset
    if nested.is_dir():
        beside = sorted(name for name in classes if (root / name).is_dir() and name != dataset)
        if beside:
            log.warning("external images: %s exists, so the class folder(s) %s directly "
                        "under %s are not read", nested, ", ".join(beside), root)
        return ImportFolder(nested, "<root>/<dataset>")
    return ImportFolder(root, "<root>")


def class_files(folder: Path, classes: Sequence[str], dataset: str
                ) -> tuple[dict[str, list[Path]], list[tuple[Path, str]]]:
    """The image files of every configured class, in path order, and the files ignored."""
    present = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [name for name in present if name not in classes]
    if unknown:
        raise DataError(
            f"external images for dataset '{dataset}': folder(s) "
            f"{', '.join(str(folder / name) for name in unknown)} are not configured classes "
            f"(datasets.{dataset}.classes: {', '.join(classes)}); rename or remove them")
    files: dict[str, list[Path]] = {}
    ignored: list[tuple[Path, str]] = []
    for class_name in classes:
        base = folder / class_name
        if not base.is_dir():
            raise DataError(f"external images for dataset '{dataset}': no folder {base} for "
                            f"class '{class_name}' (expected {folder}/<class>/ for each of: "
                            f"{', '.join(classes)})")
        found = []
        for path in sorted(base.rglob("*")):
            if path.is_dir():
                continue
            if any(part.startswith(".") for part in path.relative_to(base).parts):
                ignored.append((path, "hidden file"))
            elif path.is_symlink() and not path.exists():
                ignored.append((path, "broken symbolic link"))
            elif path.suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append((path, "not an image file (" + ", ".join(
                    sorted(IMAGE_EXTENSIONS)) + ")"))
            else:
                if path.parent != base:
                    log.warning("external images: %s is in a sub-folder of class '%s'; read "
                                "as that class", path, class_name)
                found.append(path)
        if not found:
            raise DataError(f"external images for dataset '{dataset}': {base} has no images "
                            f"of class '{class_name}' (*{', *'.join(sorted(IMAGE_EXTENSIONS))})")
        files[class_name] = found
    for path, reason in ignored:
        log.warning("external images: %s: %s; ignored", path, reason)
    return files, ignored


def read_image(path: Path, resolution: int) -> tuple[Image.Image | None, str, str, str | None]:
    """One file as RGB, the sha256 of its bytes, a note on what was converted, and the
    problem that rejects it (None if none)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return None, "", "", f"unreadable: {err}"
    digest = hashlib.sha256(data).hexdigest()
    expected = f"{resolution}x{resolution}"
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size  # from the header: nothing is decoded yet
            if (width, height) != (resolution, resolution):
                return None, digest, "", (
                    f"{width}x{height}, but the dataset resolution is {expected}; generated "
                    f"images are not resized: generate at {expected} (or resize the files "
                    "yourself)")
            opened.load()
            orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
            upright = ImageOps.exif_transpose(opened) if orientation != 1 else opened
            image, note = to_rgb(upright)
    except Image.DecompressionBombError as err:
        return None, digest, "", f"too large: {err}"
    except (OSError, SyntaxError, ValueError) as err:
        return None, digest, "", f"unreadable: {err}"
    if orientation != 1:
        note = "; ".join(filter(None, [f"turned upright (EXIF orientation {orientation})",
                                       note]))
    return image, digest, note, None


def import_images(name: str, root: Path, dataset: str, classes: Sequence[str],
                  resolution: int, out_dir: Path, reference: str = "") -> pd.DataFrame:
    """Check and copy the images of every class into ``out_dir``; return the manifest.

    All files are checked before the error is raised, so that one run names every bad
    file; ``out_dir`` is only replaced when none is bad.
    """
    started = time.perf_counter()
    chosen = import_folder(root, dataset, classes)
    files, ignored = class_files(chosen.folder, classes, dataset)
    label_of = {class_name: index for index, class_name in enumerate(classes)}
    rows: list[dict[str, Any]] = []
    origins: list[dict[str, str]] = []
    problems: list[str] = []
    first_of: dict[str, Path] = {}  # pixel hash -> first file
    duplicates = converted = 0
    with staged_directory(out_dir) as staging:
        for class_name in classes:
            for index, path in enumerate(files[class_name]):
                image, digest, note, problem = read_image(path, resolution)
                if problem is not None or image is None:
                    problems.append(f"  {path}: {problem}")
                    continue
                if problems:
                    continue  # the import fails: check the rest, write nothing more
                if note:
                    converted += 1
                    log.warning("%s: %s to RGB", path, note)
                pixels = hashlib.sha1(image.tobytes()).hexdigest()
                if pixels in first_of:
                    duplicates += 1
                    log.warning("%s: the same pixels as %s (a generator that repeats itself, "
                                "or a copied file?)", path, first_of[pixels])
                else:
                    first_of[pixels] = path
                sample_id = f"{name}_{class_name}_{index:04d}"
                relative = f"images/{class_name}/{sample_id}.png"
                save_png(staging / relative, image)
                rows.append({
                    "method": name, "source_id": sample_id, "source_class": class_name,
                    "target_class": class_name, "source_label": label_of[class_name],
                    "target_label": label_of[class_name], "frame_index": 1, "stair": 0,
                    "timestep": 0, "soft_label_weight": 1.0, "path": relative})
                origins.append({"source_id": sample_id, "path": relative,
                                "source_path": str(path.resolve()), "sha256": digest,
                                "note": note})
        if problems:
            shown = "\n".join(problems[:SHOWN_PROBLEMS])
            more = len(problems) - SHOWN_PROBLEMS
            raise DataError(
                f"external images '{name}' for dataset '{dataset}' ({chosen.folder}): "
                f"{len(problems)} image(s) rejected:\n{shown}"
                + (f"\n  and {more} more" if more > 0 else ""))
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        write_table(staging / "manifest.tsv", manifest)
        write_table(staging / "origin.tsv", pd.DataFrame(origins, columns=ORIGIN_COLUMNS))
        per_class = {class_name: len(files[class_name]) for class_name in classes}
        summary = {
            "method": name,
            "outputs": len(rows),
            "seconds": round(time.perf_counter() - started, 2),
            "outputs_per_class": per_class,
            "root": str(root),
            "folder": str(chosen.folder.resolve()),
            "layout": chosen.layout,
            "reference": reference,
            "resolution": resolution,
            "converted_to_rgb": converted,
            "duplicates": duplicates,
            "ignored_files": [f"{path}: {reason}" for path, reason in ignored],
        }
        write_text(staging / "generation.json", json.dumps(summary, indent=2))
    log.info("%s: imported %d images from %s (%s)", name, len(rows), chosen.folder,
             ", ".join(f"{c} {n}" for c, n in per_class.items()))
    return manifest
