"""dkd_det.evaluation: the statistics of a paired-seed comparison on inputs whose answers are
known by hand, the bootstrap's AP against pycocotools' own COCOeval, what a run left behind,
the tables and plots, and the measurement helpers of the benchmarks."""

import json
import math

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dkd_det import evaluation as ev

from helpers import R18, make_cfg


@pytest.mark.parametrize(
    "df, expected", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (10, 2.2281), (1000, 1.9623)]
)
def test_t_quantile_matches_the_tables(df, expected):
    assert ev.t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


def test_t_quantile_other_levels_and_bad_arguments():
    assert ev.t_quantile(0.95, 5) == pytest.approx(2.0150, abs=2e-4)  # one-sided 95%, df 5
    assert ev.t_quantile(0.995, 3) == pytest.approx(5.8409, abs=2e-4)
    for p, df in ((0.5, 3), (1.0, 3), (0.975, 0)):
        with pytest.raises(ValueError, match="0.5 < p < 1 and df >= 1"):
            ev.t_quantile(p, df)


def test_mean_sd_and_half_width_by_hand():
    s = ev.mean_sd([2.0, 4.0, 6.0, 8.0])  # mean 5, sd sqrt(20 / 3)
    assert s["mean"] == 5.0 and s["n"] == 4 and s["sd"] == pytest.approx(math.sqrt(20 / 3))
    assert math.isnan(ev.mean_sd([1.0])["sd"])
    # t(0.975, 3) = 3.1824; half width = 3.1824 * 2 / sqrt(4)
    assert ev.t_half_width(2.0, 4) == pytest.approx(3.1824, abs=1e-3)
    assert math.isnan(ev.t_half_width(2.0, 1))


def test_paired_difference_interval_by_hand():
    # d = 2, 3, 4: mean 3, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321 = 2.4841
    d = ev.paired_difference([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])
    assert d["mean"] == pytest.approx(3.0) and d["sd"] == pytest.approx(1.0)
    assert d["ci_low"] == pytest.approx(0.5159, abs=1e-3)
    assert d["ci_high"] == pytest.approx(5.4841, abs=1e-3)
    assert d["diffs"] == [2.0, 3.0, 4.0] and d["n"] == 3
    assert "is better; the interval excludes 0" in ev.describe("DKD", "plain", d)
    wide = ev.paired_difference([1.0, 3.0, 2.0], [2.0, 1.0, 1.5])  # d = -1, 2, 0.5
    assert wide["ci_low"] < 0 < wide["ci_high"]
    assert "includes 0, no difference shown" in ev.describe("DKD", "plain", wide)
    worse = ev.paired_difference([1.0, 1.0, 1.0, 1.0], [2.0, 2.1, 1.9, 2.0])
    assert "is worse" in ev.describe("DKD", "plain", worse)
    one = ev.paired_difference([1.0], [0.5])
    assert one["mean"] == 0.5 and "no interval" in ev.describe("DKD", "plain", one)
    with pytest.raises(ValueError, match="same, non-zero length"):
        ev.paired_difference([1.0, 2.0], [1.0])


def test_paired_interval_is_narrower_than_the_unpaired_one_when_seeds_move_both():
    """Pairing is the point: a seed effect shared by both variants cancels in d_k."""
    a, b = [30.0, 35.0, 40.0], [29.0, 34.2, 38.9]
    d = ev.paired_difference(a, b)
    unpaired_sd = math.sqrt(ev.mean_sd(a)["sd"] ** 2 + ev.mean_sd(b)["sd"] ** 2)
    assert d["ci_low"] > 0 and d["sd"] < unpaired_sd / 10


def test_spread_quartiles_by_hand():
    s = ev.spread([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"], s["n"]) == (3, 2, 4, 1, 5, 5)
    s = ev.spread([4.0, 1.0, 3.0, 2.0])  # inclusive: q1 = 1 + 0.75 * 1, q3 = 3 + 0.25 * 1
    assert (s["median"], s["q1"], s["q3"]) == (2.5, 1.75, 3.25)
    assert ev.spread([7.0]) == {"median": 7.0, "q1": 7.0, "q3": 7.0, "min": 7.0, "max": 7.0, "n": 1}
    with pytest.raises(ValueError):
        ev.spread([])


def test_ratio_spread_is_taken_round_by_round():
    # Per round 2, 3, 1: median 2; the ratio of the medians would be 4 / 4 = 1.
    r = ev.ratio_spread([2.0, 30.0, 4.0], [1.0, 10.0, 4.0])
    assert (r["median"], r["min"], r["max"]) == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="same, non-zero count"):
        ev.ratio_spread([1.0, 2.0], [1.0])


def test_interleaved_rounds_rotate_and_drop_the_warmup():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = ev.interleaved_ms(fns, repeats=3, warmup=1)
    assert calls == list("abc" "bca" "cab" "abc")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_peak_memory_sees_an_allocation():
    assert ev.peak_mib(lambda: torch.ones(2**21)) >= 7.9  # 8 MiB of float32

    def touch_64_mib():
        x = torch.ones(2**24)  # 64 MiB, written: resident
        return x  # alive while the memory is read, as a model's outputs would be

    assert ev.peak_rss_mib(touch_64_mib) >= 50


# ----------------------------------------------------------------------------------------------
# the bootstrap over test images, against pycocotools


def _perturbed(gt, shift=3.0):
    """Detections from the ground truth, each box shifted, with distinct scores (no ties):
    AP strictly between 0 and 100."""
    return [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": [a["bbox"][0] + shift * (i % 3), *a["bbox"][1:]],
            "score": 0.9 - 0.01 * i,
        }
        for i, a in enumerate(gt["annotations"])
    ]


def _cocoeval_ap(gt_dict, dets):
    coco = COCO()
    coco.dataset = gt_dict
    coco.createIndex()
    e = COCOeval(coco, coco.loadRes(dets), "bbox")
    e.evaluate(), e.accumulate(), e.summarize()
    return 100 * e.stats[0]


def test_resampled_ap_of_all_images_is_pycocotools_ap(tiny_data):
    gt_json = tiny_data["val"][0]
    gt = json.load(open(gt_json))
    dets = _perturbed(gt)
    resampler = ev.ImageResampledAP(COCO(gt_json), dets)
    expected = _cocoeval_ap(gt, dets)
    assert 0 < expected < 100
    assert resampler.ap() == pytest.approx(expected, abs=1e-9)


def test_a_resample_is_pycocotools_ap_of_the_images_drawn(tiny_data):
    """Image 0 drawn twice, image 1 not at all: the same AP as COCOeval on a test set made of
    those copies (new ids, in the same order)."""
    gt_json = tiny_data["val"][0]
    gt = json.load(open(gt_json))
    dets = _perturbed(gt)
    resampler = ev.ImageResampledAP(COCO(gt_json), dets)
    picks = [0, 0, 2, 3]
    ids = resampler.img_ids
    copy_gt = {"images": [], "annotations": [], "categories": gt["categories"]}
    copy_dets = []
    for new_id, i in enumerate(picks, start=1):
        image = next(im for im in gt["images"] if im["id"] == ids[i])
        copy_gt["images"].append({**image, "id": new_id})
        for a in gt["annotations"]:
            if a["image_id"] == ids[i]:
                copy_gt["annotations"].append(
                    {**a, "image_id": new_id, "id": len(copy_gt["annotations"]) + 1}
                )
        copy_dets += [{**d, "image_id": new_id} for d in dets if d["image_id"] == ids[i]]
    assert resampler.ap(picks) == pytest.approx(_cocoeval_ap(copy_gt, copy_dets), abs=1e-9)
    assert resampler.ap() == pytest.approx(_cocoeval_ap(gt, dets), abs=1e-9)  # state reset


def test_bootstrap_of_perfect_and_of_identical_detections(tmp_path, tiny_data):
    """Ground truth as detections is AP 100 on every resample; two identical result files
    differ by exactly 0 on every resample (the same images are drawn for both)."""
    gt_json = tiny_data["val"][0]
    gt = json.load(open(gt_json))
    perfect = [
        {**d, "bbox": a["bbox"], "score": 1.0} for d, a in zip(_perturbed(gt), gt["annotations"])
    ]
    shifted = _perturbed(gt)
    files = {}
    for name, dets in (("perfect", perfect), ("a", shifted), ("b", shifted), ("none", [])):
        files[name] = str(tmp_path / f"{name}.json")
        json.dump(dets, open(files[name], "w"))
    boot = ev.bootstrap_ap(gt_json, files, num=5)
    assert boot["num_images"] == len(gt["images"])
    ap = boot["ap"]
    assert ap["perfect"] == pytest.approx([100.0] * 5)
    assert [a - b for a, b in zip(ap["a"], ap["b"])] == [0.0] * 5
    assert all(0 <= x < 100 for x in ap["a"]) and len(set(ap["a"])) > 1  # resamples differ
    assert ap["none"] == [0.0] * 5
    assert ev.bootstrap_ap(gt_json, files, num=5, seed=0) == boot  # the seed fixes the draws
    # shared between processes: the same draws, the same APs in the same order
    assert ev.bootstrap_ap(gt_json, files, num=5, seed=0, workers=2) == boot
    noise = ev.bootstrap_difference(gt_json, files["a"], files["b"], num=5)
    assert noise["sd_diff"] == 0.0 and noise["sd_ap"] > 0
    assert noise["resamples"] == 5 and noise["num_images"] == len(gt["images"])


# ----------------------------------------------------------------------------------------------
# runs, tables, plots


def test_run_outputs(tmp_path):
    records = [{"iteration": 19, "time": 1.0}, {"iteration": 39, "time": 3.0}, {"bbox/AP": 1.0}]
    records.append({"iteration": 59, "time": 2.0})
    (tmp_path / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert ev.read_metrics(str(tmp_path)) == records
    assert ev.seconds_per_iter(str(tmp_path)) == 2.0
    (tmp_path / "metrics.json").write_text(json.dumps({"bbox/AP": 1.0}) + "\n")
    assert math.isnan(ev.seconds_per_iter(str(tmp_path)))
    cfg = make_cfg(R18, "OUTPUT_DIR", str(tmp_path), "DATASETS.TEST", "('my_test',)")
    assert ev.results_file(cfg) == str(
        tmp_path / "inference" / "my_test" / "coco_instances_results.json"
    )


def test_tables():
    variants = {"plain": {"ap": [1.0, 2.0], **ev.mean_sd([1.0, 2.0])}}
    variants["one"] = {"ap": [float("nan"), 3.0], "mean": 3.0, "sd": float("nan")}
    lines = ev.seed_table(variants, [0, 1])
    assert lines[:2] == ["| variant | seed 0 | seed 1 | mean | sd |", "|---|---|---|---|---|"]
    assert lines[2] == "| plain | 1.00 | 2.00 | 1.50 | 0.71 |"
    assert lines[3] == "| one | - | 3.00 | 3.00 | - |"
    d = ev.paired_difference([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])
    rows = ev.difference_table({"DKD - plain": d})
    assert rows[2] == "| DKD - plain | +3.00 | [+0.52, +5.48] | +2.00, +3.00, +4.00 |"
    assert ev.fmt(None) == "-" and ev.fmt(1.234, ".1f") == "1.2"


def test_plots_write_pngs(tmp_path):
    metrics = tmp_path / "run"
    metrics.mkdir()
    rows = [{"iteration": i, "total_loss": 1.0 / (i + 1), "loss_dkd": 0.1} for i in range(3)]
    (metrics / "metrics.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ev.plot_losses({"DKD": str(metrics)}, str(tmp_path / "losses.png"))
    ev.plot_ap_per_seed(
        {"plain": [1.0, 2.0], "DKD": [2.0, 2.5]}, str(tmp_path / "ap.png"), ("teacher", 3.0)
    )
    for name in ("losses.png", "ap.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------
# random-weight models on equal footing


@pytest.fixture(scope="module")
def random_r18():
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return build_model(make_cfg(R18)).eval()


def test_random_inputs_are_reproducible():
    a, b = ev.random_inputs(2, 64, 96, 3, seed=1), ev.random_inputs(2, 64, 96, 3, seed=1)
    assert len(a) == 2 and a[0]["image"].shape == (3, 64, 96)
    assert torch.equal(a[1]["image"], b[1]["image"])
    assert torch.equal(a[1]["instances"].gt_boxes.tensor, b[1]["instances"].gt_boxes.tensor)
    assert not torch.equal(a[0]["image"], ev.random_inputs(1, 64, 96, 3, seed=2)[0]["image"])


def test_calibrated_norms_normalise_their_input(random_r18):
    from detectron2.layers import FrozenBatchNorm2d

    model = random_r18
    inputs = ev.random_inputs(2, 96, 128, 3)
    norms = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert ev.calibrate_norms(model, inputs) == len(norms) > 0
    outputs = []
    handles = [
        m.register_forward_hook(lambda m, a, out: outputs.append(out.clone())) for m in norms
    ]
    with torch.no_grad():
        model.backbone(model.preprocess_image(inputs).tensor)
    for h in handles:
        h.remove()
    for out in outputs:  # weight 1, bias 0 as built: mean 0, variance 1 per channel
        assert out.mean((0, 2, 3)).abs().max() < 1e-3
        assert (out.var((0, 2, 3), unbiased=False) - 1).abs().max() < 1e-2


def test_equal_candidates_bound_what_reaches_nms(random_r18):
    model = random_r18
    x = {"image": ev.random_inputs(1, 96, 128, 3)[0]["image"]}
    for num in (5, 40):
        info = ev.equalise_candidates(model, x, num)
        assert info["candidates"] == num and info["proposals"] > num
        assert model.roi_heads.box_predictor.test_score_thresh == info["threshold"]
        with torch.no_grad():
            inst = model([x])[0]["instances"]
        assert 0 < len(inst) <= num and bool((inst.scores > info["threshold"]).all())
    assert ev.equalise_candidates(model, x, 10**6)["threshold"] == -1.0  # fewer: all pass
