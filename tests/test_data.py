"""dkd_det.data: missing datasets and images named before training, broken images caught or
skipped, the image check cheap and exact."""

import json
import os

import pytest

from dkd_det.engine import Trainer

from helpers import DKD_R18, captured_logs, make_cfg


def test_custom_dataset_files_missing_are_named(tmp_path, tiny_data):
    from dkd_det.data import check_datasets, register_coco_format

    json_file, image_root = tiny_data["train"]
    for name, j, r, missing in (
        ("no_json", str(tmp_path / "nope.json"), image_root, "nope.json"),
        ("no_root", json_file, str(tmp_path / "noimages"), "noimages"),
    ):
        cfg = make_cfg(
            DKD_R18,
            "DATASETS.COCO_FORMAT",
            repr([(name, j, r)]),
            "DATASETS.TRAIN",
            repr((name,)),
            "DATASETS.TEST",
            "()",
        )
        register_coco_format(cfg)
        with pytest.raises(FileNotFoundError, match=missing):
            check_datasets(cfg)


def test_image_listed_but_missing_on_disk(tmp_path, tiny_data, dkd_opts):
    import shutil

    json_file, image_root = tiny_data["train"]
    root = tmp_path / "images"
    shutil.copytree(image_root, root)
    os.remove(root / "000003.png")
    cfg = make_cfg(
        DKD_R18,
        *dkd_opts,
        "DATASETS.COCO_FORMAT",
        repr([("one_missing", json_file, str(root))]),
        "DATASETS.TRAIN",
        "('one_missing',)",
        "DATASETS.TEST",
        "()",
    )
    from dkd_det.data import register_coco_format

    register_coco_format(cfg)
    with pytest.raises(
        FileNotFoundError,
        match=r"1 of 8 images .* \(1 missing, 0 broken\).*'.*000003.png' \(missing\)",
    ):
        Trainer.build_train_loader(cfg)


# ---------------------------------------------------------------------------------------------
# Images: checked before training (train and test sets), named when the loader meets one later


def _jpeg_copy(tiny_data, split, root):
    """The split's dataset with its images re-encoded as JPEG under ``root``: (json, root)."""
    import cv2

    json_file, image_root = tiny_data[split]
    with open(json_file) as f:
        coco = json.load(f)
    os.makedirs(root, exist_ok=True)
    for image in coco["images"]:
        name = image["file_name"].replace(".png", ".jpg")
        cv2.imwrite(
            os.path.join(root, name), cv2.imread(os.path.join(image_root, image["file_name"]))
        )
        image["file_name"] = name
    out = os.path.join(root, f"{split}.json")
    with open(out, "w") as f:
        json.dump(coco, f)
    return out, str(root)


def _truncate(path, keep=0.6):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def jpeg_data(tiny_data, tmp_path_factory):
    """The tiny training set as JPEGs, one of them (000002.jpg) truncated."""
    json_file, root = _jpeg_copy(tiny_data, "train", tmp_path_factory.mktemp("jpeg") / "images")
    _truncate(os.path.join(root, "000002.jpg"))
    return json_file, root


def _jpeg_cfg(jpeg_data, name, *opts):
    from dkd_det.data import register_coco_format

    cfg = make_cfg(
        DKD_R18,
        "DATASETS.COCO_FORMAT",
        repr([(name, *jpeg_data)]),
        "DATASETS.TRAIN",
        repr((name,)),
        "DATASETS.TEST",
        "()",
        *opts,
    )
    register_coco_format(cfg)
    return cfg


def test_truncated_jpeg_is_named_before_training(jpeg_data):
    from dkd_det.data import BrokenImageError

    cfg = _jpeg_cfg(jpeg_data, "jpeg_truncated")
    with pytest.raises(BrokenImageError) as e:
        Trainer.build_train_loader(cfg)
    message = str(e.value)
    assert "1 of 8 images" in message and "(0 missing, 1 broken)" in message
    assert os.path.join(jpeg_data[1], "000002.jpg") in message and "truncated" in message
    assert "DATALOADER.SKIP_BROKEN_IMAGES" in message


def test_skip_broken_images_warns_with_the_names_and_never_loads_them(jpeg_data):
    cfg = _jpeg_cfg(jpeg_data, "jpeg_skipped", "DATALOADER.SKIP_BROKEN_IMAGES", "True")
    broken = os.path.join(jpeg_data[1], "000002.jpg")
    records, remove = captured_logs("dkd_det.data.datasets")
    try:
        loader = Trainer.build_train_loader(cfg)
    finally:
        remove()
    assert any("left out of training" in r and broken in r for r in records), records
    seen = set()
    for _, batch in zip(range(12), loader):
        seen.update(d["file_name"] for d in batch)
    assert broken not in seen and len(seen) > 1


def test_all_images_broken_is_an_error_even_when_skipping(tmp_path, tiny_data):
    from dkd_det.data import BrokenImageError, check_images

    json_file, root = _jpeg_copy(tiny_data, "val", tmp_path / "images")
    dicts = [{"file_name": os.path.join(root, n)} for n in sorted(os.listdir(root)) if "jpg" in n]
    for d in dicts:
        open(d["file_name"], "w").close()  # empty files
    with pytest.raises(BrokenImageError, match=r"4 of 4 images .*empty file.*No image is usable"):
        check_images(dicts, ["all_empty"], skip_broken=True)


def test_image_the_check_misses_is_named_by_the_loader(jpeg_data, monkeypatch):
    """Whatever passes the check before training but fails to load later (damage inside the
    compressed data, a file replaced during training) is an error that names the file."""
    import dkd_det.data.datasets as datasets
    from dkd_det.data import BrokenImageError, CheckedDatasetMapper

    broken = os.path.join(jpeg_data[1], "000002.jpg")
    monkeypatch.setattr(datasets, "find_broken_images", lambda paths: {})  # the check misses it
    loader = Trainer.build_train_loader(_jpeg_cfg(jpeg_data, "jpeg_missed"))
    with pytest.raises(BrokenImageError, match=f"Image '{broken}' could not be loaded.*truncated"):
        for _, _batch in zip(range(50), loader):
            pass
    # With SKIP_BROKEN_IMAGES the mapper leaves it out (MapDataset then draws another image).
    cfg = _jpeg_cfg(jpeg_data, "jpeg_missed_skip", "DATALOADER.SKIP_BROKEN_IMAGES", "True")
    records, remove = captured_logs("dkd_det.data.images")
    try:
        assert (
            CheckedDatasetMapper(cfg, True)({"file_name": broken, "height": 96, "width": 96})
            is None
        )
    finally:
        remove()
    assert any(broken in r for r in records)
    # A test set is never skipped: the Trainer's test loader names the file too.
    with pytest.raises(BrokenImageError, match="000002.jpg"):
        CheckedDatasetMapper(cfg, False)({"file_name": broken, "height": 96, "width": 96})
    test_loader = iter(Trainer.build_test_loader(cfg, "jpeg_missed_skip"))
    first = next(test_loader)[0]  # 000001.jpg, mapped for inference
    assert first["file_name"].endswith("000001.jpg") and "instances" not in first
    with pytest.raises(BrokenImageError, match=f"Image '{broken}' could not be loaded"):
        next(test_loader)


def test_image_check_is_cheap_and_exact(tmp_path, tiny_data):
    """Header plus end marker: every kind of broken file found, a good JPEG with bytes after
    its end marker not mistaken for a broken one."""
    from dkd_det.data import find_broken_images

    _, root = _jpeg_copy(tiny_data, "val", tmp_path / "images")
    good = [os.path.join(root, n) for n in sorted(os.listdir(root)) if n.endswith(".jpg")]
    with open(good[0], "ab") as f:
        f.write(b"\0" * 100)  # padding after EOI: PIL reads it, so must the check
    png = os.path.join(tiny_data["val"][1], sorted(os.listdir(tiny_data["val"][1]))[0])
    bad = {
        "missing.jpg": None,
        "empty.jpg": b"",
        "text.jpg": b"<html>404 Not Found</html>",
        "cut.jpg": open(good[1], "rb").read()[:400],
        "cut.png": open(png, "rb").read()[:200],
    }
    for name, data in bad.items():
        if data is not None:
            with open(tmp_path / name, "wb") as f:
                f.write(data)
    found = find_broken_images(good + [str(tmp_path / n) for n in bad])
    assert list(found) == [str(tmp_path / n) for n in bad]
    assert found[str(tmp_path / "missing.jpg")] == "missing"
    assert "empty" in found[str(tmp_path / "empty.jpg")]
    assert "not an image" in found[str(tmp_path / "text.jpg")]


def test_missing_test_image_is_an_error_before_training(tmp_path, tiny_data, dkd_opts):
    """Not after the whole schedule, at the final evaluation."""
    import shutil

    from dkd_det.data import register_coco_format

    (tj, ti), (vj, vi) = tiny_data["train"], tiny_data["val"]
    root = tmp_path / "val"
    shutil.copytree(vi, root)
    os.remove(root / "000002.png")
    cfg = make_cfg(
        DKD_R18,
        *dkd_opts,
        "DATASETS.COCO_FORMAT",
        repr([("mt_train", tj, ti), ("mt_val", vj, str(root))]),
        "DATASETS.TRAIN",
        "('mt_train',)",
        "DATASETS.TEST",
        "('mt_val',)",
        "DATALOADER.SKIP_BROKEN_IMAGES",
        "True",  # applies to training images only
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    )
    register_coco_format(cfg)
    with pytest.raises(FileNotFoundError) as e:
        Trainer(cfg)
    assert "['mt_val']" in str(e.value) and f"'{root / '000002.png'}' (missing)" in str(e.value)
    assert "An evaluation must see every image" in str(e.value)
    assert not (tmp_path / "out" / "model_final.pth").exists()
