"""tools/compare.py: paired-seed comparisons of distillation variants on a user's COCO-format
datasets, trained as processes of tools/train_net.py, resumable, refusing a test split that
is also a training split."""

import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from dkd_det.engine.comparison import Comparison, expand_variants

from helpers import NUM_CLASSES, R18, ROOT, TINY, child_pids

# Keep the detections of untrained models: the report has numbers to check.
OPTS = TINY + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]


def write_coco(root, split, num_images, seed, size=80):
    """A COCO-format split written here, not by dkd_det's generator: filled rectangles and
    ellipses of NUM_CLASSES grey levels on noise, one to three per image."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, split)
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        for _ in range(rng.integers(1, 4)):
            c = int(rng.integers(NUM_CLASSES))
            w, h = (int(v) for v in rng.integers(12, 36, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            colour = (90 + 70 * c,) * 3
            if c % 2:
                cv2.ellipse(img, (x + w // 2, y + h // 2), (w // 2, h // 2), 0, 0, 360, colour, -1)
            else:
                cv2.rectangle(img, (x, y), (x + w - 1, y + h - 1), colour, -1)
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": c + 1,
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
        name = f"{split}_{i:03d}.png"
        cv2.imwrite(os.path.join(folder, name), img)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    cats = [{"id": c + 1, "name": f"shape{c}"} for c in range(NUM_CLASSES)]
    path = os.path.join(root, f"{split}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": cats}, f)
    return f"{path}:{folder}"


@pytest.fixture(scope="module")
def coco_splits(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    return {s: write_coco(root, s, n, k) for k, (s, n) in enumerate(
        [("train", 8), ("val", 4), ("test", 6)])}  # fmt: skip


def compare_args(splits, teacher_weights, output, *extra):
    return [
        os.path.join(ROOT, "tools", "compare.py"),
        "--config-file", R18, "--teacher-config", R18, "--teacher-weights", teacher_weights,
        "--train", splits["train"], "--val", splits["val"], "--test", splits["test"],
        "--variants", "plain", "kd", "dkd", "--seeds", "2", "--iters", "2", "--jobs", "2",
        "--output", output, "--bootstrap", "5", *extra,
        "--teacher-opts", *OPTS, "--opts", *OPTS,
    ]  # fmt: skip


def pycocotools_metrics(gt_json, results_json):
    """COCO box AP, AP50, AP75, APs, APm, APl (percent; NaN where pycocotools has -1)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(gt_json)
    with open(results_json) as f:
        dets = json.load(f)
    e = COCOeval(gt, gt.loadRes(dets), "bbox")
    e.evaluate(), e.accumulate(), e.summarize()
    return [100 * s if s >= 0 else float("nan") for s in e.stats[:6]]


@pytest.mark.slow
def test_compare_end_to_end_resumes_after_a_kill_and_reports_pycocotools_ap(
    coco_splits, teacher_weights, tmp_path
):
    out = str(tmp_path / "cmp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = compare_args(coco_splits, teacher_weights, out)
    # Interrupted: killed (the whole process group, its training processes too) as soon as
    # the first run has finished.
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 300
    finished = []
    while not finished and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        runs = os.listdir(out) if os.path.isdir(out) else []
        finished = [d for d in runs if os.path.isfile(f"{out}/{d}/result.json")]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert finished, "no run finished before the deadline"
    kept = {d: os.path.getmtime(f"{out}/{d}/model_final.pth") for d in finished}
    assert len(kept) < 6

    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, text=True, timeout=600,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"({len(kept)} finished ones reused)" in done.stdout
    for d, mtime in kept.items():  # finished runs were not retrained
        assert os.path.getmtime(f"{out}/{d}/model_final.pth") == mtime

    with open(f"{out}/report.json") as f:
        report = json.load(f)
    assert [(r["variant"], r["seed"]) for r in report["runs"]] == [
        (v, s) for s in (0, 1) for v in ("plain", "KD", "DKD")
    ]
    gt_json = coco_splits["test"].split(":")[0]
    for r in report["runs"]:  # the report's numbers are pycocotools' on the evaluator's files
        expected = pycocotools_metrics(gt_json, r["evaluator_output"])
        got = [r["metrics"]["bbox"][m] for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    bbox = report["tasks"]["bbox"]
    assert set(bbox["differences"]) == {"KD - plain", "DKD - plain", "KD - DKD"}
    kd = bbox["variants"]["KD"]["ap"]
    plain = bbox["variants"]["plain"]["ap"]
    assert bbox["differences"]["KD - plain"]["diffs"] == pytest.approx(
        [a - b for a, b in zip(kd, plain)]
    )
    assert report["teacher"]["metrics"]["bbox"]["AP"] >= 0
    assert report["evaluation_noise"]["num_images"] == 6
    for picture in ("ap_per_seed.png", "losses.png", "report.md"):
        assert os.path.getsize(f"{out}/{picture}") > 0


def test_a_test_split_that_is_a_training_split_is_refused(coco_splits, teacher_weights, tmp_path):
    for same in ("train", "val"):
        splits = {**coco_splits, "test": coco_splits[same]}
        with pytest.raises(ValueError, match=f"test split .* is also the {same} split"):
            Comparison(R18, expand_variants(["plain", "dkd"]), [0], str(tmp_path),
                       {k: splits[k] for k in ("train", "val", "test")}, R18, "train_net.py",
                       teacher_weights=teacher_weights, opts=OPTS)  # fmt: skip


def test_variants_as_users_write_them():
    assert expand_variants(["dkd", "plain", "kd+dkd"]) == {
        "plain": [], "DKD": ["DKD"], "KD+DKD": ["KD", "DKD"]
    }  # fmt: skip
    every = expand_variants(["all"])
    assert every["plain"] == [] and every["DKD+PKD"] == ["DKD", "PKD"]
    assert "DKD+KD" not in every  # two logit terms on the same logits: not a default pair
    with pytest.raises(ValueError, match="registered distillation term"):
        expand_variants(["plain", "dkd+nosuch"])
    with pytest.raises(ValueError, match="must include 'plain'"):
        expand_variants(["dkd"])


def test_a_run_folder_of_another_config_is_not_overwritten(coco_splits, teacher_weights, tmp_path):
    def comparison(iters):
        return Comparison(R18, expand_variants(["plain"]), [0], str(tmp_path), coco_splits, R18,
                          "train_net.py", teacher_weights=teacher_weights, iters=iters,
                          opts=OPTS)  # fmt: skip

    first = comparison(2).runs[0]
    os.makedirs(first.output_dir)
    # a comparison killed while it wrote the config: the folder is a new run, not another's
    open(os.path.join(first.output_dir, "run_config.yaml.tmp"), "w").close()
    assert comparison(2)._state(first) == "new"
    comparison(2)._write_config(first)
    assert comparison(2)._state(first) == "partial"
    with pytest.raises(RuntimeError, match="another config"):
        c = comparison(3)
        c._state(c.runs[0])


def test_gpu_runs_go_through_detectron2s_launcher_each_job_on_its_own_gpus(
    coco_splits, teacher_weights, tmp_path
):
    c = Comparison(R18, expand_variants(["plain", "dkd"]), [0, 1], str(tmp_path), coco_splits,
                   R18, "tools/train_net.py", teacher_weights=teacher_weights, opts=OPTS,
                   jobs=2, num_gpus=4)  # fmt: skip
    cmd = c._command(c.runs[1])
    assert cmd[1:3] == ["tools/train_net.py", "--config-file"] and "--resume" in cmd
    assert cmd[cmd.index("--num-gpus") + 1] == "4" and cmd[cmd.index("--dist-url") + 1] == "auto"
    assert [c._env(slot)["CUDA_VISIBLE_DEVICES"] for slot in (0, 1)] == ["0,1,2,3", "4,5,6,7"]
    assert c.runs[1].cfg.MODEL.TEACHER.WEIGHTS == teacher_weights
    assert c.runs[1].cfg.MODEL.META_ARCHITECTURE == "DistillationRCNN"
    assert c.runs[0].cfg.MODEL.DISTILL.TERMS == [] and c.runs[1].cfg.SEED == 0


@pytest.mark.slow
def test_sigterm_stops_the_training_processes_too(coco_splits, teacher_weights, tmp_path):
    args = compare_args(coco_splits, teacher_weights, str(tmp_path / "cmp"))
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)  # fmt: skip
    deadline, children = time.time() + 120, []
    while not children and time.time() < deadline:
        time.sleep(0.2)
        children = child_pids(proc.pid)
    assert children, "no training process started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    for pid in children:  # stopped and reaped, not orphaned
        assert not os.path.exists(f"/proc/{pid}")
