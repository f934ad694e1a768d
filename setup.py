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
)
