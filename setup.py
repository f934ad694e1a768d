"""Installs the aligned_reid library (the scripts under script/ and data_set/ import it)."""
from setuptools import find_packages, setup

with open("requirements.txt") as f:
    requirements = [line.strip() for line in f if line.strip() and not line.startswith("#")]

setup(
    name="aligned_reid",
    version="0.1.0",
    description="AlignedReID (Zhang et al., arXiv 1711.08184) person re-identification in PyTorch",
    packages=find_packages(include=["aligned_reid", "aligned_reid.*"]),
    python_requires=">=3.9",
    install_requires=requirements,
    # pip install -e .[export]: script/export_onnx.py (ONNX export and its onnxruntime check);
    # .[search]: the approximate faiss first stage of script/search.py.
    extras_require={"export": ["onnx>=1.16", "onnxscript>=0.2", "onnxruntime>=1.18"],
                    "search": ["faiss-cpu>=1.8"]},
)
