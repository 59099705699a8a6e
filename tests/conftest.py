"""Shared fixtures: a tiny COCO-format dataset and a random-init teacher saved in
detectron2's checkpoint format, both written by the tests themselves (helpers in helpers.py)."""

import pytest

from helpers import NUM_CLASSES, R18, TEACHER_OPTS, make_cfg, save_random_model


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """{split: (json_file, image_root)} of a 3-class synthetic COCO-format dataset."""
    from dkd_det.data.synthetic import generate

    return generate(
        str(tmp_path_factory.mktemp("data")),
        num_train=8,
        num_val=4,
        image_size=96,
        num_classes=NUM_CLASSES,
    )


@pytest.fixture(scope="session")
def dataset_opts(tiny_data):
    (tj, ti), (vj, vi) = tiny_data["train"], tiny_data["val"]
    return [
        "DATASETS.COCO_FORMAT",
        repr([("tiny_train", tj, ti), ("tiny_val", vj, vi)]),
        "DATASETS.TRAIN",
        "('tiny_train',)",
        "DATASETS.TEST",
        "('tiny_val',)",
    ]


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory):
    return save_random_model(make_cfg(R18), str(tmp_path_factory.mktemp("teacher") / "teacher.pth"))


@pytest.fixture(scope="session")
def dkd_opts(teacher_weights):
    """Overrides that turn configs/COCO/dkd_r101_r18.yaml into a tiny, offline run."""
    return TEACHER_OPTS + ["MODEL.TEACHER.WEIGHTS", teacher_weights]
