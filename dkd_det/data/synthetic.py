"""A synthetic detection dataset in real COCO format: coloured shapes on cluttered backgrounds.

Classes are shapes x colours. Shapes that differ by a few pixels of outline (square vs
diamond, circle vs octagon) and colours that are neighbours in hue (red vs orange,
blue vs violet) make some classes hard to tell apart, so a teacher's non-target
probabilities carry information about which classes resemble each other. Objects vary
in scale, overlap (occlusion) and lie on noisy backgrounds with line clutter.

Every object has a COCO polygon ``segmentation``: the very polygon that was filled (a circle
is drawn and annotated as a 48-gon), clipped to the image, so that detectron2's COCO loader
gives masks for Mask R-CNN. Masks are amodal, like the boxes: an occluded object's mask is its
whole shape. ``area`` stays the box's area, as it always was here (COCOeval's small / medium /
large ranges, for boxes and masks alike).

    python -m dkd_det.data.synthetic --output datasets/synthetic --num-train 400 --num-val 100
"""

import argparse
import itertools
import json
import os
from typing import Dict, List, Tuple

import cv2
import numpy as np

from ..files import open_whole

__all__ = ["SHAPES", "COLOURS", "class_names", "classification_batch", "generate_split", "generate"]

SHAPES = ("square", "diamond", "circle", "octagon", "triangle")
# RGB; neighbours in this list are neighbours in hue.
COLOURS = {
    "red": (215, 45, 40),
    "orange": (230, 125, 35),
    "yellow": (225, 205, 40),
    "green": (45, 165, 65),
    "blue": (40, 85, 215),
    "violet": (120, 60, 205),
}


def class_names(num_classes: int) -> List[Tuple[str, str]]:
    """The first ``num_classes`` (shape, colour) pairs, in an order that keeps similar
    pairs together: every colour of a shape before the next shape."""
    pairs = list(itertools.product(SHAPES, COLOURS))
    if not 1 <= num_classes <= len(pairs):
        raise ValueError(f"num_classes must be in [1, {len(pairs)}], got {num_classes}")
    return pairs[:num_classes]


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Vertices (N, 2) of a shape of circumradius ``r`` (pixels) centred at (cx, cy)."""
    sides, offset = {
        "square": (4, np.pi / 4),
        "diamond": (4, 0.0),
        "octagon": (8, np.pi / 8),
        "triangle": (3, -np.pi / 2),
        "circle": (48, 0.0),
    }[shape]
    t = offset + angle + np.arange(sides) * 2 * np.pi / sides
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _clip_polygon(pts: np.ndarray, size: float) -> np.ndarray:
    """A convex polygon (N, 2) intersected with the image [0, size] x [0, size]
    (Sutherland-Hodgman against each of the four borders); (M, 2), M may be 0."""
    for axis, bound, inside in ((0, 0.0, 1), (0, size, -1), (1, 0.0, 1), (1, size, -1)):
        if not len(pts):
            break
        out = []
        for a, b in zip(pts, np.roll(pts, -1, axis=0)):
            da, db = inside * (a[axis] - bound), inside * (b[axis] - bound)
            if da >= 0:
                out.append(a)
            if (da >= 0) != (db >= 0):  # the edge crosses the border
                out.append(a + (b - a) * (da / (da - db)))
        pts = np.array(out).reshape(-1, 2)
    return pts


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.integers(70, 190, size=3)
    img = np.clip(base + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    for _ in range(rng.integers(3, 9)):  # clutter: lines in object-like colours
        p1, p2 = rng.integers(0, size, 2), rng.integers(0, size, 2)
        colour = tuple(int(c) for c in rng.integers(30, 230, 3))
        cv2.line(
            img,
            tuple(map(int, p1)),
            tuple(map(int, p2)),
            colour,
            int(rng.integers(1, 3)),
            cv2.LINE_AA,
        )
    return img


def _draw_shape(img, rng, shape, colour, cx, cy, r) -> np.ndarray:
    """Fill one shape (circumradius ``r`` px, centre (cx, cy)) into ``img`` in place, slightly
    turned and with a jittered colour; returns its vertices (N, 2)."""
    pts = _polygon(shape, cx, cy, r, angle=rng.normal(0, 0.12))
    rgb = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 12, 3), 0, 255)
    cv2.fillPoly(
        img,
        [np.round(pts * 16).astype(np.int32)],
        tuple(float(c) for c in rgb),
        cv2.LINE_AA,
        shift=4,
    )
    return pts


def _draw_image(rng, size, classes, max_objects, min_radius, max_radius):
    img = _background(rng, size)
    anns = []
    for _ in range(rng.integers(1, max_objects + 1)):
        label = int(rng.integers(len(classes)))
        shape, colour = classes[label]
        r = float(np.exp(rng.uniform(np.log(min_radius), np.log(max_radius))))  # scale variation
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, 2)
        pts = _draw_shape(img, rng, shape, colour, cx, cy, r)
        x0, y0 = np.clip(pts.min(0), 0, size)
        x1, y1 = np.clip(pts.max(0), 0, size)
        if (x1 - x0) >= 4 and (y1 - y0) >= 4:
            box = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
            polygon = [float(v) for v in _clip_polygon(pts, size).flatten()]
            anns.append((label, box, polygon))
    # Later shapes occlude earlier ones; objects hidden for the most part are still labelled,
    # as in COCO, which makes the task harder, not wrong.
    return img, anns


def classification_batch(
    rng: np.random.Generator,
    batch: int,
    size: int = 48,
    min_radius: float = 5.0,
    max_radius: float = 20.0,
) -> Tuple[np.ndarray, np.ndarray]:
    """A batch of the synthetic world's classification task, the stand-in for ImageNet: each
    image holds one shape of any of the ``len(SHAPES) * len(COLOURS)`` classes (more than any
    detection set uses, as ImageNet's classes are more than COCO's) on a cluttered background,
    plus a smaller distractor shape of another class at an edge.

    Returns:
        images (batch, size, size, 3) uint8 RGB, labels (batch,) int64 in
        [0, len(SHAPES) * len(COLOURS)), class i being ``class_names(30)[i]``.
    """
    classes = class_names(len(SHAPES) * len(COLOURS))
    images = np.empty((batch, size, size, 3), np.uint8)
    labels = rng.integers(len(classes), size=batch)
    for i, label in enumerate(labels):
        img = _background(rng, size)
        other = classes[(label + rng.integers(1, len(classes))) % len(classes)]
        corner = rng.uniform(0, size, 2) * (rng.random(2) < 0.5)
        _draw_shape(img, rng, *other, corner[0], corner[1], min_radius)
        r = float(np.exp(rng.uniform(np.log(min_radius), np.log(max_radius))))
        cx, cy = size / 2 + rng.uniform(-0.15, 0.15, 2) * size
        _draw_shape(img, rng, *classes[label], cx, cy, r)
        images[i] = img
    return images, labels.astype(np.int64)


def generate_split(
    output_dir: str,
    split: str,
    num_images: int,
    image_size: int = 128,
    num_classes: int = 12,
    max_objects: int = 6,
    min_radius: float = 6.0,
    max_radius: float = 30.0,
    seed: int = 0,
) -> Tuple[str, str]:
    """Write ``output_dir/<split>/*.png`` and ``output_dir/<split>.json`` (COCO instances:
    boxes and polygon segmentations).

    Returns:
        (json_file, image_root). Same arguments, same files (seeded).
    """
    rng = np.random.default_rng(seed)
    classes = class_names(num_classes)
    image_root = os.path.join(output_dir, split)
    os.makedirs(image_root, exist_ok=True)
    coco: Dict[str, list] = {
        "images": [],
        "annotations": [],
        "categories": [
            {"id": i + 1, "name": f"{c}-{s}", "supercategory": s}
            for i, (s, c) in enumerate(classes)
        ],
    }
    for image_id in range(1, num_images + 1):
        img, anns = _draw_image(rng, image_size, classes, max_objects, min_radius, max_radius)
        file_name = f"{image_id:06d}.png"
        cv2.imwrite(os.path.join(image_root, file_name), img[:, :, ::-1])
        coco["images"].append(
            {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
        )
        for label, bbox, polygon in anns:
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": bbox,
                    "segmentation": [polygon],
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    json_file = os.path.join(output_dir, f"{split}.json")
    with open_whole(json_file) as f:  # the JSON appears only once every image is written
        json.dump(coco, f)
    return json_file, image_root


def generate(
    output_dir: str, num_train: int, num_val: int, num_test: int = 0, seed: int = 0, **kwargs
) -> Dict[str, Tuple[str, str]]:
    """Write a train, a val and (if ``num_test`` > 0) a test split, each from its own seed;
    returns {split: (json_file, image_root)}."""
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    return {
        split: generate_split(output_dir, split, n, seed=seed + i, **kwargs)
        for i, (split, n) in enumerate(sizes.items())
        if n > 0 or split != "test"
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", default="datasets/synthetic")
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--num-test", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for split, (json_file, root) in generate(
        args.output,
        args.num_train,
        args.num_val,
        args.num_test,
        seed=args.seed,
        image_size=args.image_size,
        num_classes=args.num_classes,
    ).items():
        print(f"{split}: {json_file} ({root})")


if __name__ == "__main__":
    main()
