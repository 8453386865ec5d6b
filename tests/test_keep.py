"""Previous outputs survive a rerun that fails, and the next run still redoes the job."""

from __future__ import annotations

import os
from pathlib import Path

from cellflow.keep import RESTORED_MTIME, back_up, discard, restore_missing


def make_outputs(root: Path) -> tuple[Path, Path]:
    table = root / "results" / "d" / "table.tsv"
    folder = root / "results" / "d" / "images"
    (folder / "sub").mkdir(parents=True)
    table.write_text("previous\n")
    (folder / "a.png").write_bytes(b"a")
    (folder / "sub" / "b.png").write_bytes(b"b")
    return table, folder


def test_outputs_deleted_by_a_failed_rerun_come_back_dated_for_a_rerun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table, folder = make_outputs(tmp_path)
    store = Path("results/.previous")
    kept = back_up(["results/d/table.tsv", "results/d/images", "results/d/absent.tsv"], store)
    assert kept == [Path("results/d/table.tsv"), Path("results/d/images")]
    # what Snakemake does before a rerun, and a job that dies before writing anything
    table.unlink()
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    folder.rmdir()
    restored = restore_missing(store)
    assert sorted(restored) == [Path("results/d/images"), Path("results/d/table.tsv")]
    assert table.read_text() == "previous\n" and (folder / "sub" / "b.png").read_bytes() == b"b"
    assert all(os.lstat(path).st_mtime == RESTORED_MTIME
               for path in [table, folder, *folder.rglob("*")])
    assert not store.exists()


def test_a_finished_rerun_keeps_its_new_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table, _ = make_outputs(tmp_path)
    store = Path("results/.previous")
    back_up(["results/d/table.tsv"], store)
    table.unlink()
    table.write_text("new\n")  # the rerun wrote its result (a new file, as our jobs do)
    assert restore_missing(store) == []
    assert table.read_text() == "new\n"


def test_backups_are_links_not_copies_and_a_discard_removes_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table, _ = make_outputs(tmp_path)
    store = Path("results/.previous")
    back_up(["results/d/table.tsv"], store)
    assert os.stat(store / "files" / "results/d/table.tsv").st_ino == os.stat(table).st_ino
    discard(store)
    assert not store.exists() and table.read_text() == "previous\n"
