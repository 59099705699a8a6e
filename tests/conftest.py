"""Shared fixtures: a tiny COCO-format dataset and a random-init teacher saved in
detectron2's checkpoint format, both written by the tests themselves."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 3

# Small enough for a 2-core CPU; everything else comes from the real configs.
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.ROI_HEADS.NUM_CLASSES", str(NUM_CLASSES),
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "64",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "300",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
    "MODEL.RPN.PRE_NMS_TOPK_TEST", "300",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.ROI_BOX_HEAD.FC_DIM", "128",
    "INPUT.MIN_SIZE_TRAIN", "(96,)",
    "INPUT.MAX_SIZE_TRAIN", "128",
    "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "128",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.BASE_LR", "0.002",
    "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.STEPS", "()",
    "SEED", "1",
]
R18 = os.path.join(ROOT, "configs/COCO/faster_rcnn_r18_fpn.yaml")
R50 = os.path.join(ROOT, "configs/COCO/faster_rcnn_r50_fpn.yaml")
DKD_R18 = os.path.join(ROOT, "configs/COCO/dkd_r101_r18.yaml")


def make_cfg(config_file, *opts):
    """A frozen dkd-det config: the file, the tiny overrides, then ``opts``."""
    from detectron2.config import get_cfg

    from dkd_det import add_dkd_config

    cfg = get_cfg()
    add_dkd_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(TINY + list(opts))
    cfg.freeze()
    return cfg


def save_random_model(cfg, path):
    """Build ``cfg``'s model with random weights and save it as detectron2 does."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=os.path.dirname(path)).save(os.path.basename(path)[: -len(".pth")])
    return path


@torch.no_grad()
def randomise_bn(model):
    """Non-trivial BN statistics and affine terms, so that a misplaced or wrongly mapped norm
    layer shows in the outputs."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """{split: (json_file, image_root)} of a 3-class synthetic COCO-format dataset."""
    from dkd_det.data.synthetic import generate

    return generate(str(tmp_path_factory.mktemp("data")), num_train=8, num_val=4, image_size=96, num_classes=NUM_CLASSES)


@pytest.fixture(scope="session")
def dataset_opts(tiny_data):
    (tj, ti), (vj, vi) = tiny_data["train"], tiny_data["val"]
    return [
        "DATASETS.COCO_FORMAT", repr([("tiny_train", tj, ti), ("tiny_val", vj, vi)]),
        "DATASETS.TRAIN", "('tiny_train',)",
        "DATASETS.TEST", "('tiny_val',)",
    ]


# The teacher: the R-18 baseline config itself, random-init, in detectron2's .pth format.
TEACHER_OPTS = ["MODEL.TEACHER.CONFIG_FILE", R18, "MODEL.TEACHER.OPTS", repr(TINY)]


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory):
    return save_random_model(make_cfg(R18), str(tmp_path_factory.mktemp("teacher") / "teacher.pth"))


@pytest.fixture(scope="session")
def dkd_opts(teacher_weights):
    """Overrides that turn configs/COCO/dkd_r101_r18.yaml into a tiny, offline run."""
    return TEACHER_OPTS + ["MODEL.TEACHER.WEIGHTS", teacher_weights]


def run_tool(script, *args, env=None, timeout=600):
    """Run ``tools/<script>`` as users do, in a process; returns CompletedProcess whose
    ``stdout`` holds stdout and stderr together (detectron2 logs to stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", script), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
