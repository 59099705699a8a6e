"""Evaluation noise of COCO box AP: a bootstrap over the test images, with pycocotools.

How much of a difference between two models is the choice of test images? Resample the
images with replacement, the same resample for every model, and look at the spread of AP and
of the difference. pycocotools matches detections to ground truth once per image; a resample
only re-accumulates those per-image matches, so each costs a fraction of an evaluation.
"""

import concurrent.futures
import contextlib
import copy
import io
import json
import multiprocessing
import statistics
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["ImageResampledAP", "bootstrap_ap", "bootstrap_difference"]


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        yield


class ImageResampledAP:
    """COCO box AP (percent, IoU 0.50:0.95, all areas, 100 detections: pycocotools'
    ``stats[0]``) of one model's detections on any multiset of the test images.

    Args:
        coco_gt: a ``pycocotools.coco.COCO`` of the ground truth (shared between models).
        detections: COCO results (``[{"image_id", "category_id", "bbox" XYWH, "score"}]``),
            as detectron2's COCOEvaluator writes to ``coco_instances_results.json``.
    """

    def __init__(self, coco_gt, detections: Sequence[dict]):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        with _quiet():
            dt = coco_gt.loadRes(list(detections)) if detections else COCO()
            e = COCOeval(coco_gt, dt, "bbox")
            e.params.areaRng, e.params.areaRngLbl, e.params.maxDets = [[0, 1e10]], ["all"], [100]
            e.evaluate()
        self._eval = e
        self._per_image = list(e.evalImgs)  # (category, image) matches, category-major
        self.img_ids: List[int] = list(e.params.imgIds)  # sorted, as pycocotools keeps them

    def ap(self, picks: Optional[Sequence[int]] = None) -> float:
        """AP on the images ``img_ids[i] for i in picks`` (repeats count again, as a bootstrap
        resample needs); all images once by default. NaN if no category has ground truth."""
        e, n = self._eval, len(self.img_ids)
        picks = range(n) if picks is None else list(picks)
        num_cats = len(e.params.catIds)
        e.evalImgs = [self._per_image[k * n + i] for k in range(num_cats) for i in picks]
        e.params.imgIds = [self.img_ids[i] for i in picks]
        e._paramsEval = copy.deepcopy(e.params)  # what accumulate() reads the layout from
        with _quiet():
            e.accumulate()
        precision = e.eval["precision"][..., 0, 0]  # (IoU, recall, class)
        valid = precision > -1
        return 100 * float(precision[valid].mean()) if valid.any() else float("nan")


def _resampled_aps(gt_json: str, results: Dict[str, str], picks) -> Dict[str, List[float]]:
    """{model name: [AP on each image resample of ``picks``]}: one process's share."""
    from pycocotools.coco import COCO

    with _quiet():
        coco = COCO(gt_json)
    out = {}
    for name, path in results.items():
        with open(path) as f:
            e = ImageResampledAP(coco, json.load(f))
        out[name] = [e.ap(pick) for pick in picks]
    return out


def bootstrap_ap(
    gt_json: str, results: Dict[str, str], num: int, seed: int = 0, workers: int = 1
) -> dict:
    """COCO box AP (percent) of each model on ``num`` bootstrap resamples of the test images.

    Args:
        gt_json: the test set's COCO-format ground truth.
        results: {model name: its COCO results file (detectron2's
            ``inference/<dataset>/coco_instances_results.json``)}.
        num: resamples; each draws ``len(images)`` images with replacement, the same images
            for every model.
        seed: of the resampling (numpy's ``default_rng``).
        workers: processes sharing the resamples (the same draws, so the same result as one).

    Returns:
        ``{"ap": {name: [AP per resample]}, "num_images": images in the test set}``.
    """
    with open(gt_json) as f:
        num_imgs = len({im["id"] for im in json.load(f)["images"]})
    rng = np.random.default_rng(seed)
    picks = [rng.integers(num_imgs, size=num_imgs) for _ in range(num)]
    workers = max(1, min(workers, num))
    if workers == 1:
        return {"ap": _resampled_aps(gt_json, results, picks), "num_images": num_imgs}
    # Not fork: this process has threads (torch's, the caller's), and a forked child may inherit
    # a lock that one of them held (Python 3.12 warns). A forkserver imports this module once
    # (torch and detectron2 with it: seconds) and forks the workers from that single-threaded
    # process; they get only the file names and the draws, and run pycocotools and numpy.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    else:
        context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        shares = [
            pool.submit(_resampled_aps, gt_json, results, [picks[i] for i in chunk])
            for chunk in np.array_split(np.arange(num), workers)  # workers <= num: none empty
        ]
        shares = [share.result() for share in shares]
    aps = {name: [ap for share in shares for ap in share[name]] for name in results}
    return {"ap": aps, "num_images": num_imgs}


def bootstrap_difference(
    gt_json: str, file_a: str, file_b: str, num: int, seed: int = 0, workers: int = 1
) -> dict:
    """The evaluation noise of a comparison of model a with model b (:func:`bootstrap_ap`).

    Returns:
        ``{"num_images", "resamples", "sd_ap"`` (sd of a's AP over the resamples),
        ``"sd_diff"`` (sd of a's AP minus b's, image resample by image resample)``}``, AP in
        percent. Compare ``sd_diff`` with the seed-to-seed sd of the paired difference: what
        the seeds add beyond the test images' noise.
    """
    boot = bootstrap_ap(gt_json, {"a": file_a, "b": file_b}, num, seed, workers)
    a, b = boot["ap"]["a"], boot["ap"]["b"]
    return {
        "num_images": boot["num_images"],
        "resamples": num,
        "sd_ap": statistics.stdev(a),
        "sd_diff": statistics.stdev([x - y for x, y in zip(a, b)]),
    }
