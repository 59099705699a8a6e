"""What the tests share: tiny overrides of the real configs, random-init models saved in
detectron2's formats, and running tools/ as processes."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 3

# Small enough for a 2-core CPU; everything else comes from the real configs.
TINY = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.WEIGHTS",
    "",
    "MODEL.ROI_HEADS.NUM_CLASSES",
    str(NUM_CLASSES),
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "64",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
    "300",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN",
    "100",
    "MODEL.RPN.PRE_NMS_TOPK_TEST",
    "300",
    "MODEL.RPN.POST_NMS_TOPK_TEST",
    "100",
    "MODEL.FPN.OUT_CHANNELS",
    "64",
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    "128",
    "INPUT.MIN_SIZE_TRAIN",
    "(96,)",
    "INPUT.MAX_SIZE_TRAIN",
    "128",
    "INPUT.MIN_SIZE_TEST",
    "96",
    "INPUT.MAX_SIZE_TEST",
    "128",
    "DATALOADER.NUM_WORKERS",
    "0",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.BASE_LR",
    "0.002",
    "SOLVER.WARMUP_ITERS",
    "0",
    "SOLVER.STEPS",
    "()",
    "SEED",
    "1",
]
R18 = os.path.join(ROOT, "configs/COCO/faster_rcnn_r18_fpn.yaml")
R50 = os.path.join(ROOT, "configs/COCO/faster_rcnn_r50_fpn.yaml")
DKD_R18 = os.path.join(ROOT, "configs/COCO/dkd_r101_r18.yaml")


def batch(n=2, size=96, seed=0):
    """Inputs as detectron2's DatasetMapper makes them: CHW uint8-valued float, with boxes."""
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 50.0, 60.0], [40.0, 30.0, 90.0, 80.0]]))
        inst.gt_classes = torch.tensor([0, 2])
        out.append(
            {
                "image": torch.randint(0, 256, (3, size, size), generator=g).float(),
                "instances": inst,
                "height": size,
                "width": size,
            }
        )
    return out


def make_cfg(config_file, *opts):
    """A frozen dkd-det config: the file, the tiny overrides, then ``opts``."""
    from dkd_det.config import get_dkd_cfg

    cfg = get_dkd_cfg(config_file, TINY + list(opts))
    cfg.freeze()
    return cfg


def save_random_model(cfg, path):
    """Build ``cfg``'s model with random weights and save it as detectron2 does."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=os.path.dirname(path)).save(
        os.path.basename(path)[: -len(".pth")]
    )
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


# The teacher: the R-18 baseline config itself, random-init, in detectron2's .pth format.
TEACHER_OPTS = ["MODEL.TEACHER.CONFIG_FILE", R18, "MODEL.TEACHER.OPTS", repr(TINY)]

# Cascade R-CNN: the students' configs, and the R-18 config made a Cascade teacher.
DKD_CASCADE_R18 = os.path.join(ROOT, "configs/COCO/dkd_cascade50_cascade18.yaml")
CASCADE = [
    "MODEL.ROI_HEADS.NAME",
    "CascadeROIHeads",
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG",
    "True",
]
CASCADE_TEACHER_OPTS = [
    "MODEL.TEACHER.CONFIG_FILE",
    R18,
    "MODEL.TEACHER.OPTS",
    repr(TINY + CASCADE),
]

# A LazyConfig teacher (.py): a tiny R-18-FPN Faster R-CNN, BGR with caffe-style ImageNet
# normalisation (the student of configs/COCO/*_r18.yaml reads RGB), NUM_CLASSES classes.
LAZY_TEACHER = f"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers, StandardROIHeads

levels = ["p2", "p3", "p4", "p5"]
model = L(GeneralizedRCNN)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
            stages=L(ResNet.make_default_stages)(depth=18, norm="FrozenBN"),
            out_features=["res2", "res3", "res4", "res5"],
        ),
        in_features="${{.bottom_up.out_features}}",
        out_channels=64,
        top_block=L(LastLevelMaxPool)(),
    ),
    proposal_generator=L(RPN)(
        in_features=levels + ["p6"],
        head=L(StandardRPNHead)(in_channels=64, num_anchors=3),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[32], [64], [128], [256], [512]],
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(
            thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True
        ),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(300, 300),
        post_nms_topk=(100, 100),
        nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes={NUM_CLASSES},
        batch_size_per_image=64,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(
            thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False
        ),
        box_in_features=levels,
        box_pooler=L(ROIPooler)(
            output_size=7,
            scales=(1 / 4, 1 / 8, 1 / 16, 1 / 32),
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
        ),
        box_head=L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=64, height=7, width=7), conv_dims=[], fc_dims=[128, 128]
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=128),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=(10, 10, 5, 5)),
            num_classes="${{..num_classes}}",
        ),
    ),
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[57.375, 57.120, 58.395],
    input_format="BGR",
)
"""


def save_lazy_teacher(folder, extra=""):
    """Write LAZY_TEACHER (plus ``extra`` lines) to ``folder/lazy_teacher.py`` and its random
    weights as detectron2's LazyConfig trainer saves them (DetectionCheckpointer:
    ``{"model": state_dict, ...}``); returns (config path, weights path)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate

    config = os.path.join(str(folder), "lazy_teacher.py")
    with open(config, "w") as f:
        f.write(LAZY_TEACHER + extra)
    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(config).model)
    DetectionCheckpointer(model, save_dir=str(folder)).save("lazy_teacher")
    return config, os.path.join(str(folder), "lazy_teacher.pth")


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


def load_tool(script):
    """Import ``tools/<script>`` as a module (by path: the name ``tools`` is taken by a package
    that the detectron2 wheel installs), to test a script's functions directly."""
    import importlib.util

    path = os.path.join(ROOT, "tools", script)
    spec = importlib.util.spec_from_file_location(os.path.splitext(script)[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_net_here(*argv):
    """Run ``tools/train_net.py <argv>`` in this process as its ``__main__`` does (its own
    argument parser, then dkd-det's launcher with one process), and return what ``main``
    returns. For the many short config runs, where a process each spends half its time
    importing torch and detectron2. The log handlers that the run adds (to its output folder)
    are closed afterwards."""
    import logging

    def loggers():
        every = logging.Logger.manager.loggerDict.values()
        return [logging.getLogger()] + [lg for lg in every if isinstance(lg, logging.Logger)]

    tool = load_tool("train_net.py")
    before = {lg: set(lg.handlers) for lg in loggers()}
    try:
        return tool.launch(tool.main, tool.argument_parser().parse_args(list(argv)))
    finally:
        for lg in loggers():
            for handler in set(lg.handlers) - before.get(lg, set()):
                lg.removeHandler(handler)
                handler.close()


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(*torchrun_args):
    """The command that runs ``torchrun <torchrun_args> tools/train_net.py`` with this Python;
    append train_net.py's own arguments."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *torchrun_args,
        os.path.join(ROOT, "tools", "train_net.py"),
    ]


def child_pids(pid):
    """The pids of the processes whose parent is ``pid`` (read from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # the process ended meanwhile
            if ppid == pid:
                children.append(int(entry))
    return children


def process_env(pid):
    """The environment ``pid`` started with, as a dict (read from /proc)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv]
    return {k.decode(): v.decode(errors="replace") for k, v in items}


def captured_logs(name):
    """A list that receives the messages of logger ``name`` (caplog misses loggers that
    detectron2's setup_logger set not to propagate)."""
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger(name).addHandler(handler)
    return records, lambda: logging.getLogger(name).removeHandler(handler)


def vanilla_predictions(config_file, images, folder, fields, check="True"):
    """The predictions of an exported model on ``images`` by vanilla detectron2, in a process
    that never imports dkd_det: ``config_file`` merged into ``get_cfg()``, its MODEL.WEIGHTS
    loaded, detectron2's DefaultPredictor. ``check`` is a Python expression on ``model`` that
    must hold (e.g. the ROI heads' type). Returns, per image, the tuple of the instances'
    ``fields`` (e.g. ("pred_boxes", "scores")), boxes as their tensor."""
    import textwrap

    result = os.path.join(str(folder), "vanilla.pt")
    script = textwrap.dedent(f"""
        import sys, cv2, torch
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.engine import DefaultPredictor
        from detectron2.modeling import build_model
        cfg = get_cfg()
        cfg.merge_from_file({config_file!r})
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
        assert type(model).__name__ == "GeneralizedRCNN" and ({check}), {check!r}
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        predictor = DefaultPredictor(cfg)
        res = []
        for path in {list(images)!r}:
            inst = predictor(cv2.imread(path))["instances"]
            res.append(tuple(
                inst.pred_boxes.tensor if f == "pred_boxes" else inst.get(f) for f in {fields!r}
            ))
        torch.save(res, {result!r})
        assert not any(m.startswith("dkd_det") for m in sys.modules), "dkd_det was imported"
        """)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=str(folder), env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result)
