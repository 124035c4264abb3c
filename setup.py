"""Packaging: ddpm_fast plus kernels/ installed as ddpm_fast.kernels (a top-level `kernels`
package is taken on PyPI). The C++/CUDA extension is added by csrc/ (see the extension issue)."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["ddpm_fast", "ddpm_fast.*"]) + ["ddpm_fast.kernels"],
    package_dir={"ddpm_fast.kernels": "kernels"},
    package_data={"ddpm_fast.ops": ["backend_table.json"]},
)
