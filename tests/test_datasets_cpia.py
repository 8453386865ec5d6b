import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from cellflow.config import DatasetConfig, SplitConfig, SyntheticConfig
from cellflow.data import prepare_dataset
from cellflow.datasets import KINDS
from cellflow.datasets.common import DataError
from cellflow.datasets.cpia import KIND, overlapping_kind, read, wsi_of
from tests.layouts import PREPARE, dataset_config
from tests.layouts.cpia import SUB_DATASETS, make_cpia

GUARD = "sub-dataset left out: holds {}'s images (leakage guard, options.exclude_overlap_with)"


def cpia(root: Path, classes=(), resolution=16, **options) -> DatasetConfig:
    return dataset_config("cpia", root, classes, name="pool", resolution=resolution,
                          options={"exclude": [], "exclude_overlap_with": [], **options})


def by_path(listing):
    return {raw.relative_path: raw for raw in listing.images}


def reasons(listing):
    return {path.relative_to(listing.root).as_posix(): why for path, why in listing.ignored_files}


def test_lists_every_sub_dataset_with_pseudo_labels_slides_and_scales(tmp_path):
    layout = make_cpia(tmp_path / "cpia")
    listing = read(cpia(layout.root), layout.root)
    found = by_path(listing)
    assert set(found) == set(layout.images)
    for relative, expected in layout.images.items():
        raw = found[relative]
        assert raw.source_path == layout.root / relative
        assert raw.label_name == expected.sub_dataset
        assert raw.official_split is None and raw.region is None
        assert raw.group == expected.group, relative
        assert dict(raw.extra) == {"sub_dataset": expected.sub_dataset, "scale": expected.scale}
    # the slide of a patch is the same at every patch size
    assert (
        found["M/TCGA-BRCA-384/TCGA-A2-A04P-01Z-384-5-2.jpg"].group
        == found["L/TCGA-BRCA-960/TCGA-A2-A04P-01Z/TCGA-A2-A04P-01Z-960-2-1.jpg"].group
    )
    assert not any(raw.relative_path.startswith("All/") for raw in listing.images)
    why = reasons(listing)
    assert "merged copy of the scale folders" in why["All"]
    assert list(why).count("All") == 1 and not any(p.startswith("All/") for p in why)
    assert why["L/ReadMe.md"] == "not in a sub-dataset folder"
    assert why["L/BreakHis/labels.csv"].startswith("not an image file")
    assert why["L/BreakHis/.DS_Store"] == "hidden file"
    assert listing.listed_counts()[("", "Chaoyang")] == 3
    assert any("pseudo-label" in note for note in listing.notes)
    assert any(note.startswith("leakage guard off") for note in listing.notes)


def test_links_and_hidden_folders_are_listed_as_not_read(tmp_path):
    layout = make_cpia(tmp_path / "cpia")
    chaoyang = layout.root / "M" / "Chaoyang"
    (chaoyang / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (chaoyang / "elsewhere").symlink_to(layout.root / "L" / "MHIST", target_is_directory=True)
    (chaoyang / ".thumbnails").mkdir()
    (chaoyang / ".thumbnails" / "535.jpg").write_bytes(b"")
    listing = read(cpia(layout.root), layout.root)
    assert set(by_path(listing)) == set(layout.images)
    why = reasons(listing)
    assert why["M/Chaoyang/gone.jpg"] == "broken symbolic link"
    assert why["M/Chaoyang/elsewhere"] == "symbolic link to a folder; not followed"
    assert why["M/Chaoyang/.thumbnails"] == "hidden folder; not read"


def test_is_an_unlabelled_pool_that_the_doctor_surveys_by_reading():
    assert KINDS["cpia"] is KIND
    assert KIND.labelled is False and KIND.known_classes is None
    assert KIND.published == {} and KIND.annotation_files(Path("."), {}) == []
    assert KIND.survey is None


@pytest.mark.parametrize(
    ("kinds", "left_out"),
    [
        (["mhist"], {"L/MHIST": "mhist"}),
        (["chaoyang"], {"M/Chaoyang": "chaoyang"}),
        (["gleason2019"], {"L/Gleason 2019": "gleason2019"}),
        (["prcc"], {"M/TCGA-KIRP-384": "prcc"}),
        (
            ["mhist", "prcc", "chaoyang"],
            {"L/MHIST": "mhist", "M/TCGA-KIRP-384": "prcc", "M/Chaoyang": "chaoyang"},
        ),
    ],
)
def test_leakage_guard_leaves_out_the_sub_datasets_of_the_other_datasets(tmp_path, kinds, left_out):
    layout = make_cpia(tmp_path / "cpia")
    listing = read(cpia(layout.root, exclude_overlap_with=kinds), layout.root)
    kept = {
        relative
        for relative in layout.images
        if not any(relative.startswith(folder + "/") for folder in left_out)
    }
    assert set(by_path(listing)) == kept
    why = reasons(listing)
    for folder, kind_name in left_out.items():
        assert why[folder] == GUARD.format(kind_name)
        assert not any(path.startswith(folder + "/") for path in why)
        count = layout.counts[folder]
        assert any(
            note.startswith(
                f"sub-dataset {folder} left out ({count} images): holds {kind_name}'s images"
            )
            for note in listing.notes
        )
    assert sum(1 for reason in why.values() if reason.startswith("sub-dataset")) == len(left_out)


def test_leakage_guard_says_what_it_cannot_find(tmp_path):
    layout = make_cpia(tmp_path / "cpia")
    listing = read(cpia(layout.root, exclude_overlap_with=["bci", "aml"]), layout.root)
    assert set(by_path(listing)) == set(layout.images)
    assert any("bci" in note and "CPIA's tables do not list it" in note for note in listing.notes)
    assert any(
        "no sub-dataset folder of the scales read holds aml's images" in note
        for note in listing.notes
    )


@pytest.mark.parametrize("options", [{}, {"exclude_overlap_with": None}])
def test_absent_or_null_guard_of_a_hand_built_config_leaves_nothing_out(tmp_path, options):
    layout = make_cpia(tmp_path / "cpia")
    dataset = DatasetConfig(
        name="pool",
        kind="cpia",
        resolution=16,
        classes=(),
        transitions=(),
        split=SplitConfig(0.2, 0.2),
        synthetic=SyntheticConfig(4, 64),
        options=options,
    )
    assert set(by_path(read(dataset, layout.root))) == set(layout.images)


@pytest.mark.parametrize(
    ("folder", "kind_name"),
    [
        ("MHIST", "mhist"),
        ("mhist", "mhist"),
        ("Chaoyang", "chaoyang"),
        ("BreastPathQ", "breastpathq"),
        ("Breast_PathQ", "breastpathq"),
        ("Gleason2019", "gleason2019"),
        ("Gleason 2019", "gleason2019"),
        ("Gleason_2019", "gleason2019"),
        ("AML_Cytomorphology", "aml"),
        ("AMLCytomorphology", "aml"),
        ("AML-Cytomorphology_LMU", "aml"),
        ("TCGA-KIRP-384", "prcc"),
        ("TCGA-KIRP-960-patient", "prcc"),
        ("TCGA-KICH-384", None),
        ("TCGA-BRCA-960", None),
        ("BreakHis", None),
        ("AML", None),
    ],
)
def test_guard_matches_the_spellings_of_each_source(folder, kind_name):
    everything = ["mhist", "chaoyang", "bci", "aml", "prcc", "breastpathq", "gleason2019"]
    assert overlapping_kind(folder, everything) == kind_name


def test_guard_refuses_an_unknown_kind(tmp_path):
    layout = make_cpia(tmp_path / "cpia")
    with pytest.raises(DataError, match=r"exclude_overlap_with names 'camelyon'"):
        read(cpia(layout.root, exclude_overlap_with=["camelyon"]), layout.root)


def test_wsi_names_come_only_from_cpias_patch_sizes():
    assert wsi_of("TCGA-2K-A9WE-01Z-384-0-1") == "TCGA-2K-A9WE-01Z"
    assert wsi_of("normal_001-3840-12-7") == "normal_001"
    assert wsi_of("malignant_SOB_M_DC-14-2523-40-010") == ""
    assert wsi_of("535") == ""


def test_exclude_leaves_out_named_sub_datasets_and_refuses_unknown_names(tmp_path):
    layout = make_cpia(tmp_path / "cpia")
    listing = read(cpia(layout.root, exclude=["BreakHis", "TCGA-BRCA-384"]), layout.root)
    assert {raw.label_name for raw in listing.images} == set(SUB_DATASETS) - {
        "BreakHis",
        "TCGA-BRCA-384",
    }
    why = reasons(listing)
    assert why["L/BreakHis"] == "sub-dataset left out: named in options.exclude"
    assert "L/BreakHis/labels.csv" not in why
    assert any(
        note.startswith("sub-dataset L/BreakHis left out (3 images)") for note in listing.notes
    )
    with pytest.raises(DataError, match=r"options\.exclude names 'Breakhis'"):
        read(cpia(layout.root, exclude=["Breakhis"]), layout.root)


def test_scales_selects_scale_folders_and_names_a_missing_one(tmp_path):
    layout = make_cpia(tmp_path / "cpia")
    listing = read(cpia(layout.root, scales=["M"]), layout.root)
    assert set(by_path(listing)) == {p for p in layout.images if p.startswith("M/")}
    why = reasons(listing)
    assert why["L"] == "scale not in datasets.pool.options.scales"
    assert "All" in why
    with pytest.raises(
        DataError,
        match=r"scale folder\(s\) .*/XL \(datasets\.pool\.options"
        r"\.scales\) not found.* holds scale folders L, M",
    ):
        read(cpia(layout.root, scales=["M", "XL"]), layout.root)
    with pytest.raises(DataError, match="options.scales is empty"):
        read(cpia(layout.root, scales=[]), layout.root)


def test_reads_a_lone_merged_folder_or_a_root_without_scale_folders(tmp_path):
    merged = make_cpia(tmp_path / "merged", layout="merged")
    listing = read(cpia(merged.root), merged.root)
    assert {p: (r.label_name, r.group, dict(r.extra)) for p, r in by_path(listing).items()} == {
        p: (i.sub_dataset, i.group, {"sub_dataset": i.sub_dataset, "scale": "All"})
        for p, i in merged.images.items()
    }
    with pytest.raises(DataError, match=r"only All/"):
        read(cpia(merged.root, scales=["L"]), merged.root)

    plain = make_cpia(tmp_path / "plain", layout="plain")
    listing = read(cpia(plain.root, exclude_overlap_with=["prcc"]), plain.root)
    assert set(by_path(listing)) == {p for p in plain.images if not p.startswith("TCGA-KIRP")}
    assert {raw.extra["scale"] for raw in listing.images} == {""}
    assert reasons(listing)["TCGA-KIRP-384"] == GUARD.format("prcc")


def test_a_per_slide_copy_beside_its_patch_set_is_not_read_twice(tmp_path):
    layout = make_cpia(tmp_path / "cpia")
    shutil.copytree(
        layout.root / "L" / "TCGA-BRCA-960", layout.root / "L" / "TCGA-BRCA-960-patient"
    )
    listing = read(cpia(layout.root), layout.root)
    assert set(by_path(listing)) == set(layout.images)
    assert reasons(listing)["L/TCGA-BRCA-960-patient"].startswith(
        "sub-dataset left out: a per-slide copy of TCGA-BRCA-960"
    )


def test_classes_select_sub_datasets_and_name_absent_or_excluded_ones(tmp_path):
    layout = make_cpia(tmp_path / "cpia")
    listing = read(cpia(layout.root, classes=("BreakHis", "TCGA-KIRP-384")), layout.root)
    assert {raw.label_name for raw in listing.images} == {"BreakHis", "TCGA-KIRP-384"}
    assert reasons(listing)["M/Chaoyang"] == "sub-dataset not in datasets.pool.classes"
    with pytest.raises(
        DataError,
        match=r"datasets\.pool\.classes names sub-dataset 'CRC-VAL'"
        r", which is not in the scales read",
    ):
        read(cpia(layout.root, classes=("BreakHis", "CRC-VAL")), layout.root)
    with pytest.raises(
        DataError,
        match=r"datasets\.pool\.classes names sub-dataset "
        r"'TCGA-KIRP-384', which is left out: holds prcc's",
    ):
        read(
            cpia(layout.root, classes=("BreakHis", "TCGA-KIRP-384"), exclude_overlap_with=["prcc"]),
            layout.root,
        )


def test_config_check_flags_classes_the_options_leave_out():
    entry = {
        "kind": "cpia",
        "classes": ["BreakHis", "Gleason_2019", "NCT-CRC"],
        "options": {"exclude": ["NCT-CRC"], "exclude_overlap_with": ["gleason2019"]},
    }
    assert list(KIND.config_problems("pool", entry)) == [
        "datasets.pool.classes[1]: sub-dataset 'Gleason_2019' is left out: holds "
        "gleason2019's images (leakage guard, options.exclude_overlap_with)",
        "datasets.pool.classes[2]: sub-dataset 'NCT-CRC' is left out: named in options.exclude",
    ]
    assert list(KIND.config_problems("pool", {"kind": "cpia", "options": {}})) == []


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"CPIA root .*/absent does not exist"):
        read(cpia(tmp_path / "absent"), tmp_path / "absent")


def test_prepares_the_pool_without_the_guarded_sub_datasets(tmp_path):
    layout = make_cpia(tmp_path / "cpia")
    out = tmp_path / "prepared"
    dataset = cpia(layout.root, exclude_overlap_with=["mhist", "prcc"])
    prepare_dataset(dataset, PREPARE, layout.root, out, seed=0)
    manifest = pd.read_csv(out / "manifest.tsv", sep="\t", keep_default_na=False)
    kept = set(SUB_DATASETS) - {"MHIST", "TCGA-KIRP-384"}
    assert set(manifest["label_name"]) == kept
    assert (manifest["label_name"] == manifest["sub_dataset"]).all()
    assert len(manifest) == sum(1 for image in layout.images.values() if image.sub_dataset in kept)
    assert set(manifest["scale"]) == {"L", "M"}
    for _, images in manifest.groupby("label_name"):
        assert set(images["split"]) == {"train", "val", "test"}
    slides = manifest[manifest["group"] != ""]
    assert (slides.groupby("group")["split"].nunique() == 1).all()
    assert set(slides["group"]) == {"TCGA-A1-A0SB-01Z", "TCGA-A2-A04P-01Z", "TCGA-B6-A0RE-01Z"}
    excluded = pd.read_csv(out / "excluded.tsv", sep="\t", keep_default_na=False)
    reason_of = dict(zip(excluded["source_path"], excluded["reason"], strict=True))
    assert reason_of[str(layout.root / "L" / "MHIST")] == GUARD.format("mhist")
    assert reason_of[str(layout.root / "M" / "TCGA-KIRP-384")] == GUARD.format("prcc")
    notes = json.loads((out / "source.json").read_text())["notes"]
    assert (
        "sub-dataset L/MHIST left out (3 images): holds mhist's images (leakage guard, "
        "options.exclude_overlap_with)" in notes
    )
    assert any(note.startswith("sub-dataset M/TCGA-KIRP-384 left out (4 images)") for note in notes)
