"""Tests of clipad.data: miniature MVTec AD / VisA / meta.json / folder trees built in tmp_path,
the few-shot protocol against an independent re-derivation of the official AdaptCLIP calls,
and the batch loader's handling of unreadable files."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipad.data import AnomalyDataset, LoadFailure, Sample, SampleLoader, collate_samples, create_dataset, few_shot_split, folder_dataset, list_datasets, make_loader, meta_dataset, mvtec_dataset, sample_references, visa_dataset
from clipad.errors import ClipadError, UnknownNameError

# --------------------------------------------------------------------------- builders


def _image(path: Path, value: int = 128, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value // 2, 255 - value)).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (8, 6), on: int = 255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.zeros((size[1], size[0]), np.uint8)
    values[1:3, 2:5] = on
    Image.fromarray(values).save(path)
    return path


MVTEC = {
    # class: (n_train, n_test_good, {defect: n_images})
    "bottle": (12, 2, {"broken": 3, "crack": 1}),
    "cable": (5, 1, {"bent": 2}),
}


def _make_mvtec(root: Path) -> Path:
    for cls, (n_train, n_good, defects) in MVTEC.items():
        for i in range(n_train):
            _image(root / cls / "train" / "good" / f"{i:03d}.png", i)
        for i in range(n_good):
            _image(root / cls / "test" / "good" / f"{i:03d}.png", 10 + i)
        for defect, n in defects.items():
            for i in range(n):
                _image(root / cls / "test" / defect / f"{i:03d}.png", 200 + i)
                _mask(root / cls / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


VISA_ROWS = [
    # object, split, label, image stem; train rows deliberately not in sorted order
    ("candle", "train", "normal", "0003"),
    ("candle", "train", "normal", "0000"),
    ("candle", "train", "normal", "0002"),
    ("candle", "train", "normal", "0001"),
    ("candle", "train", "normal", "0005"),
    ("candle", "test", "normal", "0004"),
    ("candle", "test", "anomaly", "000"),
    ("candle", "test", "anomaly", "001"),
    ("pcb1", "train", "normal", "0000"),
    ("pcb1", "train", "normal", "0001"),
    ("pcb1", "test", "normal", "0002"),
    ("pcb1", "test", "anomaly", "000"),
]


def _make_visa(root: Path, with_csv: bool = True) -> Path:
    lines = ["object,split,label,image,mask"]
    for cls, split, label, stem in VISA_ROWS:
        kind = "Normal" if label == "normal" else "Anomaly"
        image = f"{cls}/Data/Images/{kind}/{stem}.JPG"
        Image.new("RGB", (8, 6), (30, 60, 90)).save(_parent(root / image), format="JPEG")
        mask = ""
        if label == "anomaly":
            mask = f"{cls}/Data/Masks/Anomaly/{stem}.png"
            _mask(root / mask, on=1)  # raw VisA masks store defects as small labels
        lines.append(f"{cls},{split},{label},{image},{mask}")
    if with_csv:
        (root / "split_csv").mkdir(parents=True, exist_ok=True)
        (root / "split_csv" / "1cls.csv").write_text("\n".join(lines) + "\n")
    return root


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _official_style_meta(root: Path) -> dict:
    """meta.json as the official MVTec generator lays it out (independent re-implementation:
    species in directory order, images sorted, masks paired by sorted position)."""
    info: dict = {"train": {}, "test": {}}
    for cls in sorted(MVTEC):
        for phase in ("train", "test"):
            entries = []
            for specie in os.listdir(root / cls / phase):
                abnormal = specie != "good"
                names = sorted(os.listdir(root / cls / phase / specie))
                masks = sorted(os.listdir(root / cls / "ground_truth" / specie)) if abnormal else None
                for idx, name in enumerate(names):
                    entries.append(
                        {
                            "img_path": f"{cls}/{phase}/{specie}/{name}",
                            "mask_path": f"{cls}/ground_truth/{specie}/{masks[idx]}" if abnormal else "",
                            "cls_name": cls,
                            "specie_name": specie,
                            "anomaly": 1 if abnormal else 0,
                        }
                    )
            info[phase][cls] = entries
    return info


def _official_adaptclip_picks(pool: list, k: int, seed: int) -> list:
    """The calls of AdaptCLIP's PromptDataset on one class's train list, on the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        indices = torch.randint(0, len(pool), (k,))
        return [pool[i] for i in indices]


def _triples(ds: AnomalyDataset) -> set[tuple[str, int, str | None, str]]:
    return {(str(s.image_path), s.label, str(s.mask_path) if s.mask_path else None, s.split) for s in ds}


# --------------------------------------------------------------------------- Sample / index


def test_sample_fields_and_dataset_filtering() -> None:
    samples = [
        Sample(Path("a.png"), 0, "x", split="train"),
        Sample(Path("b.png"), 1, "x", Path("b_mask.png"), "crack"),
        Sample(Path("c.png"), 1, "y", None, "hole"),
    ]
    ds = AnomalyDataset(samples, name="toy")
    assert len(ds) == 3 and ds[1] is samples[1] and list(ds) == samples
    assert ds.classes == ["x", "y"]
    assert [s.image_path.name for s in ds.filter(class_name="x", split="test")] == ["b.png"]
    assert len(ds.filter(label=1)) == 2 and len(ds.train_normals("x")) == 1
    assert isinstance(ds[:2], AnomalyDataset) and len(ds[:2]) == 2
    assert samples[0].has_pixel_truth and samples[1].has_pixel_truth and not samples[2].has_pixel_truth
    with pytest.raises(UnknownNameError, match=r"'z'.*x, y"):
        ds.filter(class_name="z")


# --------------------------------------------------------------------------- MVTec AD


def test_mvtec_counts_labels_masks(tmp_path: Path) -> None:
    root = _make_mvtec(tmp_path / "mvtec")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = mvtec_dataset(root)
    assert ds.classes == ["bottle", "cable"]
    for cls, (n_train, n_good, defects) in MVTEC.items():
        c = ds.for_class(cls)
        assert len(c.filter(split="train")) == n_train
        assert all(s.label == 0 and s.defect_type == "good" for s in c.filter(split="train"))
        test = c.filter(split="test")
        assert len(test.filter(label=0)) == n_good
        assert len(test.filter(label=1)) == sum(defects.values())
        for s in test:
            assert s.class_name == cls
            if s.label == 0:
                assert s.mask_path is None and s.defect_type == "good"
            else:
                assert s.defect_type in defects
                assert s.mask_path == root / cls / "ground_truth" / s.defect_type / f"{s.image_path.stem}_mask.png"
                assert s.image_path.parent.name == s.defect_type
    # train normals in sorted file-name order (what the official meta.json lists)
    names = [s.image_path.name for s in ds.train_normals("bottle")]
    assert names == sorted(os.listdir(root / "bottle" / "train" / "good"))


def test_mvtec_class_selection_and_single_class_root(tmp_path: Path) -> None:
    root = _make_mvtec(tmp_path / "mvtec")
    assert mvtec_dataset(root, classes=["cable"]).classes == ["cable"]
    single = mvtec_dataset(root / "bottle")
    assert single.classes == ["bottle"] and len(single) == len(mvtec_dataset(root).for_class("bottle"))


def test_mvtec_missing_mask_warns_and_keeps_label(tmp_path: Path) -> None:
    root = _make_mvtec(tmp_path / "mvtec")
    (root / "bottle" / "ground_truth" / "broken" / "001_mask.png").unlink()
    with pytest.warns(UserWarning, match=r"broken.*1 anomalous image\(s\) have no mask.*001\.png"):
        ds = mvtec_dataset(root, classes=["bottle"])
    s = next(s for s in ds if s.image_path.name == "001.png" and s.defect_type == "broken")
    assert s.label == 1 and s.mask_path is None and not s.has_pixel_truth


def test_mvtec_mask_without_image_warns(tmp_path: Path) -> None:
    root = _make_mvtec(tmp_path / "mvtec")
    _mask(root / "bottle" / "ground_truth" / "broken" / "099_mask.png")
    _mask(root / "bottle" / "ground_truth" / "gone" / "000_mask.png")
    with pytest.warns(UserWarning) as record:
        ds = mvtec_dataset(root, classes=["bottle"])
    messages = " | ".join(str(w.message) for w in record)
    assert "099_mask.png" in messages and "gone" in messages and "ignored" in messages
    assert all(s.mask_path is None or s.mask_path.name != "099_mask.png" for s in ds)


def test_mvtec_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(ClipadError, match=r"MVTec AD root '.*nowhere' does not exist"):
        mvtec_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClipadError, match=r"no MVTec AD class under '.*empty'.*test/<defect>"):
        mvtec_dataset(tmp_path / "empty")
    root = _make_mvtec(tmp_path / "mvtec")
    with pytest.raises(ClipadError, match=r"class directory of 'toaster' '.*toaster' does not exist"):
        mvtec_dataset(root, classes=["toaster"])


def test_mvtec_class_without_test_images(tmp_path: Path) -> None:
    root = tmp_path / "mvtec"
    (root / "screw" / "test" / "good").mkdir(parents=True)
    with pytest.raises(ClipadError, match=r"'screw': no test images under '.*screw/test'"):
        with pytest.warns(UserWarning, match="holds no images"):
            mvtec_dataset(root)


# --------------------------------------------------------------------------- VisA


def test_visa_csv_split(tmp_path: Path) -> None:
    root = _make_visa(tmp_path / "visa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = visa_dataset(root)
    assert ds.classes == ["candle", "pcb1"]
    for cls in ds.classes:
        rows = [r for r in VISA_ROWS if r[0] == cls]
        c = ds.for_class(cls)
        assert len(c) == len(rows)
        for split in ("train", "test"):
            expected = [(label, stem) for o, sp, label, stem in rows if sp == split]
            got = [("normal" if s.label == 0 else "anomaly", s.image_path.stem) for s in c.filter(split=split)]
            assert got == expected  # split file row order kept
        for s in c.filter(label=1):
            assert s.mask_path == root / cls / "Data" / "Masks" / "Anomaly" / f"{s.image_path.stem}.png"
        assert all(s.mask_path is None for s in c.filter(label=0))


def test_visa_label_masks_load_as_defects(tmp_path: Path) -> None:
    # raw VisA masks store defects as 1: read at 0.5 of 255 every defect would vanish
    ds = visa_dataset(_make_visa(tmp_path / "visa"))
    batch = collate_samples([SampleLoader(ds.filter(split="test"))[i] for i in range(len(ds.filter(split="test")))])
    assert not batch.failures
    for sample, mask in zip(batch.samples, batch.masks):
        assert mask is not None and bool(mask.any()) == (sample.label == 1)


def test_visa_without_csv_scans_with_warning(tmp_path: Path) -> None:
    root = _make_visa(tmp_path / "visa", with_csv=False)
    with pytest.warns(UserWarning, match=r"1cls\.csv' not found; indexing by directory scan"):
        ds = visa_dataset(root)
    assert ds.classes == ["candle", "pcb1"]
    assert all(s.split == "test" for s in ds)
    n_anom = sum(1 for r in VISA_ROWS if r[2] == "anomaly")
    assert len(ds) == len(VISA_ROWS) and len(ds.filter(label=1)) == n_anom
    assert all(s.mask_path is not None and s.mask_path.stem == s.image_path.stem for s in ds.filter(label=1))


def test_visa_bad_split_files(tmp_path: Path) -> None:
    root = _make_visa(tmp_path / "visa")
    csv = root / "split_csv" / "1cls.csv"
    good_text = csv.read_text()
    csv.write_text(good_text.replace("object,split,label,image,mask", "object,set,label,image_path,mask_path"))
    with pytest.raises(ClipadError, match=r"1cls\.csv': missing column\(s\) split, image, mask"):
        visa_dataset(root)
    csv.write_text(good_text.replace("candle,test,anomaly", "candle,test,defective", 1))
    with pytest.raises(ClipadError, match=r"1cls\.csv', line 8: label 'defective'"):
        visa_dataset(root)
    csv.write_text(good_text)
    with pytest.raises(ClipadError, match=r"no class 'capsules'; it lists: candle, pcb1"):
        visa_dataset(root, classes=["capsules"])
    with pytest.raises(ClipadError, match=r"split file '.*other\.csv' does not exist"):
        visa_dataset(root, split_csv=root / "other.csv")
    (root / "candle" / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    with pytest.warns(UserWarning, match=r"candle.*no mask.*001\.JPG"):
        ds = visa_dataset(root)
    assert next(s for s in ds if s.image_path.stem == "001").mask_path is None


def test_visa_class_dir_listed_but_missing(tmp_path: Path) -> None:
    root = _make_visa(tmp_path / "visa")
    csv = root / "split_csv" / "1cls.csv"
    csv.write_text(csv.read_text() + "fryum,test,normal,fryum/Data/Images/Normal/0000.JPG,\n")
    with pytest.raises(ClipadError, match=r"class directory of 'fryum'.*does not exist"):
        visa_dataset(root)


# --------------------------------------------------------------------------- meta.json


def test_meta_json_matches_directory_index(tmp_path: Path) -> None:
    root = _make_mvtec(tmp_path / "mvtec")
    meta = _official_style_meta(root)
    (root / "meta.json").write_text(json.dumps(meta, indent=4))
    from_meta = meta_dataset(root)
    from_dirs = mvtec_dataset(root)
    assert _triples(from_meta) == _triples(from_dirs)
    assert set(from_meta.classes) == set(MVTEC)
    s = next(s for s in from_meta if s.label == 1)
    assert s.defect_type in MVTEC[s.class_name][2]
    # train lists keep their file order
    for cls in MVTEC:
        assert [str(s.image_path) for s in from_meta.train_normals(cls)] == [
            str(root / e["img_path"]) for e in meta["train"][cls]
        ]


def test_meta_json_visa_style_and_mask_problems(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _image(root / "c" / "n.png")
    _image(root / "c" / "a1.png")
    _image(root / "c" / "a2.png")
    _image(root / "c" / "a3.png")
    _mask(root / "c" / "a1_mask.png")
    (root / "c" / "maskdir").mkdir()
    entry = lambda img, mask, anomaly: {  # noqa: E731
        "img_path": img, "mask_path": mask, "cls_name": "c", "specie_name": "", "anomaly": anomaly
    }
    meta = {
        "train": {},
        "test": {
            "c": [
                entry("c/n.png", "", 0),
                entry("c/a1.png", "c/a1_mask.png", 1),
                entry("c/a2.png", "", 1),  # official reader: all-normal mask
                entry("c/a3.png", "c/maskdir", 1),  # official reader: "just for classification"
            ]
        },
    }
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"2 anomalous image\(s\) have no mask.*a2\.png.*a3\.png"):
        ds = meta_dataset(root)
    by_name = {s.image_path.name: s for s in ds}
    assert by_name["a1.png"].mask_path == root / "c" / "a1_mask.png"
    assert by_name["a2.png"].mask_path is None and by_name["a3.png"].mask_path is None
    assert by_name["n.png"].defect_type == "good" and by_name["a1.png"].defect_type == "anomaly"
    assert all(s.split == "test" for s in ds)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", r"not valid JSON: .* line 1"),
        ('{"train": {}}', r'no "test" object'),
        ('{"test": {"c": [{"mask_path": "", "anomaly": 0}]}}', r"test\['c'\]\[0\] has no img_path"),
        ('{"test": {"c": [{"img_path": "x.png", "anomaly": 2}]}}', r"anomaly is 2, expected 0 or 1"),
        ('{"test": {"c": []}}', r"no test entries"),
    ],
)
def test_meta_json_bad_files(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "meta.json").write_text(content)
    with pytest.raises(ClipadError, match=message) as info:
        meta_dataset(tmp_path)
    assert "meta.json" in str(info.value)


def test_meta_json_missing(tmp_path: Path) -> None:
    with pytest.raises(ClipadError, match=r"meta file '.*meta\.json' does not exist"):
        meta_dataset(tmp_path)
    with pytest.raises(ClipadError, match=r"root '.*absent' does not exist"):
        meta_dataset(tmp_path / "absent")


# --------------------------------------------------------------------------- folder


def _make_folder(root: Path) -> Path:
    for i in range(5):
        _image(root / "good" / f"ok_{i}.png", i)
    for i in range(3):
        _image(root / "bad" / f"scratch_{i}.jpg", 100 + i)
    _image(root / "bad2" / "dent.png", 222)
    _mask(root / "masks" / "scratch_0_mask.png")
    _mask(root / "masks" / "scratch_1.png")
    _mask(root / "masks" / "dent_mask.png")
    return root


def test_folder_dataset(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "widgets")
    with pytest.warns(UserWarning, match=r"1 anomalous image\(s\) have no mask.*scratch_2\.jpg"):
        ds = folder_dataset(root, normal_dirs=["good"], abnormal_dirs=["bad", "bad2"], mask_dirs="masks")
    assert ds.classes == ["widgets"]
    assert len(ds.filter(label=0)) == 5 and len(ds.filter(label=1)) == 4
    assert all(s.split == "test" for s in ds)
    masks = {s.image_path.name: s.mask_path for s in ds.filter(label=1)}
    assert masks == {
        "scratch_0.jpg": root / "masks" / "scratch_0_mask.png",
        "scratch_1.jpg": root / "masks" / "scratch_1.png",
        "scratch_2.jpg": None,
        "dent.png": root / "masks" / "dent_mask.png",
    }
    assert {s.defect_type for s in ds.filter(label=1)} == {"bad", "bad2"}


def test_folder_without_masks_and_class_name(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "widgets")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no masks given: no per-image warnings
        ds = folder_dataset(root, normal_dirs="good", abnormal_dirs="bad", class_name="metal plate")
    assert ds.classes == ["metal plate"] and all(s.mask_path is None for s in ds)


def test_folder_orphan_masks_warn(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "widgets")
    _mask(root / "masks" / "unrelated_mask.png")
    with pytest.warns(UserWarning) as record:
        folder_dataset(root, normal_dirs="good", abnormal_dirs=["bad", "bad2"], mask_dirs="masks")
    assert any("unrelated_mask.png" in str(w.message) and "ignored" in str(w.message) for w in record)


def test_folder_bad_inputs(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "widgets")
    with pytest.raises(ClipadError, match=r"normal directory '.*widgets/oks' does not exist.*relative to the root"):
        folder_dataset(root, normal_dirs="oks")
    (root / "empty").mkdir()
    with pytest.raises(ClipadError, match=r"abnormal directory '.*empty' contains no images \(looked for .*\.png"):
        folder_dataset(root, normal_dirs="good", abnormal_dirs="empty")
    with pytest.raises(ClipadError, match="at least one normal or abnormal directory"):
        folder_dataset(root)
    with pytest.raises(ClipadError, match=r"scratch_0\.jpg' is in both a normal and an abnormal directory"):
        folder_dataset(root, normal_dirs=".", abnormal_dirs="bad", mask_dirs="masks")
    with pytest.raises(ClipadError, match=r"root '.*nowhere' does not exist"):
        folder_dataset(tmp_path / "nowhere", normal_dirs="good")


def test_create_dataset_registry(tmp_path: Path) -> None:
    assert list_datasets() == ["folder", "meta", "mvtec", "visa"]
    root = _make_folder(tmp_path / "w")
    ds = create_dataset("folder", root, normal_dirs=["good"], abnormal_dirs=["bad2"])
    assert len(ds) == 6
    with pytest.raises(UnknownNameError, match=r"'mvtec2'.*folder, meta, mvtec, visa"):
        create_dataset("mvtec2", root)


# --------------------------------------------------------------------------- few-shot sampling


@pytest.mark.parametrize("seed", [10, 20, 30])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_references_match_official_adaptclip_procedure(tmp_path: Path, seed: int, k: int) -> None:
    root = _make_mvtec(tmp_path / "mvtec")
    ds = mvtec_dataset(root)
    for cls in MVTEC:
        # the official pool: meta["train"][cls] = sorted listing of train/good
        pool = [root / cls / "train" / "good" / n for n in sorted(os.listdir(root / cls / "train" / "good"))]
        expected = _official_adaptclip_picks(pool, k, seed)
        got = sample_references(ds.train_normals(cls), k, seed)
        assert got == expected
        assert len(got) == k
        assert all(p in pool for p in got)


def test_references_follow_visa_csv_order(tmp_path: Path) -> None:
    root = _make_visa(tmp_path / "visa")
    ds = visa_dataset(root)
    pool = [root / f"candle/Data/Images/Normal/{stem}.JPG" for o, sp, lb, stem in VISA_ROWS if o == "candle" and sp == "train"]
    for seed in (10, 20, 30):
        assert sample_references(ds.train_normals("candle"), 4, seed) == _official_adaptclip_picks(pool, 4, seed)


def test_references_deterministic_and_leave_global_rng_alone(tmp_path: Path) -> None:
    pool = [Path(f"{i:03d}.png") for i in range(50)]
    state = torch.get_rng_state()
    first = sample_references(pool, 4, 10)
    assert torch.equal(torch.get_rng_state(), state)
    assert sample_references(pool, 4, 10) == first
    assert {tuple(sample_references(pool, 4, s)) for s in (10, 20, 30)} != {tuple(first)}


def test_references_distinct_option_and_replacement_default() -> None:
    pool = [Path("a.png"), Path("b.png")]
    official = sample_references(pool, 4, 10)  # 4 draws from 2: repeats, as the official code
    assert len(official) == 4 and set(official) <= set(pool)
    assert official == _official_adaptclip_picks(pool, 4, 10)
    many = [Path(f"{i}.png") for i in range(9)]
    for seed in range(20):
        picks = sample_references(many, 4, seed, replace=False)
        assert len(set(picks)) == 4 and set(picks) <= set(many)
    with pytest.raises(ClipadError, match="4 distinct reference images from a pool of 2"):
        sample_references(pool, 4, 10, replace=False)
    with pytest.raises(ClipadError, match="pool of normal images is empty"):
        sample_references([], 1, 10)
    assert sample_references(pool, 0, 10) == []


def test_few_shot_split_with_training_split(tmp_path: Path) -> None:
    ds = mvtec_dataset(_make_mvtec(tmp_path / "mvtec"))
    refs, test = few_shot_split(ds, "bottle", 2, 10)
    assert refs == sample_references(ds.train_normals("bottle"), 2, 10)
    assert _triples(test) == _triples(ds.filter(class_name="bottle", split="test"))


def test_few_shot_split_without_training_split_excludes_references(tmp_path: Path) -> None:
    root = _make_folder(tmp_path / "widgets")
    ds = folder_dataset(root, normal_dirs="good", abnormal_dirs="bad")
    with pytest.warns(UserWarning, match=r"no training split: 2 reference image\(s\) drawn from its 5 normal test images"):
        refs, test = few_shot_split(ds, "widgets", 2, 10, replace=False)
    normals = [s.image_path for s in ds.filter(label=0)]
    assert len(set(refs)) == 2 and set(refs) <= set(normals)
    assert refs == sample_references(normals, 2, 10, replace=False)
    assert not set(refs) & {s.image_path for s in test}
    assert len(test) == len(ds) - 2 and len(test.filter(label=1)) == 3


# --------------------------------------------------------------------------- loading


def test_loader_loads_images_masks_and_skips_unreadable(tmp_path: Path) -> None:
    root = _make_mvtec(tmp_path / "mvtec")
    ds = mvtec_dataset(root, classes=["bottle"]).filter(split="test")
    broken = next(s for s in ds if s.defect_type == "crack").image_path
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    (root / "bottle" / "ground_truth" / "broken" / "002_mask.png").write_bytes(b"")
    batches = list(make_loader(ds, batch_size=3))
    loaded = [s for b in batches for s in b.samples]
    failures = [f for b in batches for f in b.failures]
    assert len(loaded) + len(failures) == len(ds)
    assert len(failures) == 2
    lines = sorted(str(f) for f in failures)
    assert any(str(broken) in line and "truncated or corrupt" in line and "skipped" in line for line in lines)
    assert any("002_mask.png" in line and "empty file" in line and "image skipped" in line for line in lines)
    for batch in batches:
        assert len(batch.images) == len(batch.samples) == len(batch.masks) == len(batch.indices)
        for image, mask, sample in zip(batch.images, batch.masks, batch.samples):
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            assert mask is not None and mask.dtype == torch.bool
            assert tuple(mask.shape) == (image.height, image.width)
            assert bool(mask.any()) == (sample.label == 1)


def test_loader_transform_stacks_and_unknown_mask_is_none(tmp_path: Path) -> None:
    samples = [
        Sample(_image(tmp_path / "n.png"), 0, "c"),
        Sample(_image(tmp_path / "a.png"), 1, "c", None, "hole"),
        Sample(_image(tmp_path / "b.png", size=(4, 4)), 1, "c", _mask(tmp_path / "b_mask.png", size=(8, 8))),
    ]

    def to_tensor(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(image.resize((5, 5)))).permute(2, 0, 1).float() / 255

    loader = SampleLoader(samples, transform=to_tensor)
    with pytest.warns(UserWarning, match=r"b_mask\.png' is 8x8 but its image is 4x4"):
        batch = collate_samples([loader[i] for i in range(len(loader))])
    assert isinstance(batch.images, torch.Tensor) and batch.images.shape == (3, 3, 5, 5)
    assert batch.masks[1] is None
    assert batch.masks[2] is not None and batch.masks[2].shape == (4, 4)
    no_masks = SampleLoader(samples, load_masks=False)[2]
    assert not isinstance(no_masks, LoadFailure) and no_masks.mask is None


# -- generated data (clipad.data.synthetic) ------------------------------------------------------
def test_synthetic_set_masks_mark_exactly_the_anomalies():
    from clipad.data.synthetic import synthetic_set

    data = synthetic_set(10, 48, seed=2, anomalous_fraction=0.3)
    assert data.images.shape == (10, 3, 48, 48) and data.images.dtype == torch.float32
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    assert data.labels.tolist() == [0] * 7 + [1] * 3
    area = data.masks.flatten(1).sum(1)
    assert (area[:7] == 0).all()
    assert ((area[7:] >= 16 * 16) & (area[7:] <= 24 * 24)).all()  # a square of side 48/3 .. 48/3 + 48/6
    again = synthetic_set(10, 48, seed=2, anomalous_fraction=0.3)
    assert torch.equal(again.images, data.images)
    with pytest.raises(ClipadError, match="anomalous_fraction"):
        synthetic_set(4, 32, anomalous_fraction=1.5)


def test_written_mvtec_tree_loads_with_its_masks(tmp_path):
    from clipad.data import make_loader, mvtec_dataset
    from clipad.data.synthetic import write_mvtec_tree

    write_mvtec_tree(tmp_path, ["a", "b"], n_train=2, n_good=3, n_bad=4, size=32, seed=1)
    ds = mvtec_dataset(tmp_path)
    test = [s for s in ds if s.split == "test"]
    assert sorted({s.class_name for s in ds}) == ["a", "b"]
    assert len([s for s in ds if s.split == "train"]) == 4
    assert sum(s.label for s in test) == 8 and len(test) == 14
    for batch in make_loader(test, batch_size=7):
        for smp, mask in zip(batch.samples, batch.masks):
            assert bool(mask.any()) == bool(smp.label)
