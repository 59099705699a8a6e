"""dkd-det: Decoupled Knowledge Distillation for detectron2 object detectors."""

from setuptools import find_packages, setup

setup(
    name="dkd_det",
    version="0.1.0",
    description="Decoupled Knowledge Distillation (DKD) for Faster R-CNN in detectron2",
    packages=find_packages(exclude=("tests", "tools", "configs")),
    python_requires=">=3.8",
    # detectron2 is deliberately not listed: it is installed from its git repository or from
    # the sal-detectron2 wheel (see requirements.txt and README), and listing one distribution
    # would install a second copy beside the other.
    install_requires=["torch>=1.10", "torchvision", "fvcore", "pycocotools", "opencv-python"],
    # ONNX export and ONNX Runtime (tools/export_student.py --format onnx); TorchScript needs
    # nothing more. The same pins as requirements-deploy.txt.
    extras_require={"deploy": ["onnx==1.16.2", "onnxruntime==1.18.1"]},
)
