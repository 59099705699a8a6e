"""dkd-det: Decoupled Knowledge Distillation for detectron2 object detectors."""

from setuptools import find_packages, setup

setup(
    name="dkd_det",
    version="0.1.0",
    description="Decoupled Knowledge Distillation (DKD) for Faster R-CNN in detectron2",
    packages=find_packages(exclude=("tests", "tools", "configs")),
    python_requires=">=3.10",
    # detectron2 is deliberately not listed: it is not on PyPI under its own name; it is built
    # from its git repository (tools/install_detectron2.sh) or, on the oldest stack, comes from
    # the sal-detectron2 wheel (requirements/, README "Environment"), and listing one
    # distribution would install a second copy beside the other.
    install_requires=["torch>=2.3", "torchvision", "fvcore", "pycocotools", "opencv-python"],
    # ONNX export and ONNX Runtime (tools/export_student.py --format onnx); TorchScript needs
    # nothing more. The tested versions are pinned per stack in requirements/.
    extras_require={"deploy": ["onnx>=1.16", "onnxruntime>=1.18"]},
)
