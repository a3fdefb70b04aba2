"""megatron-bitpipe: BitPipe and other pipeline-parallel schedules for megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron-bitpipe",
    version="0.1.0",
    description="BitPipe, V-shape, breadth-first, Chimera and zero-bubble pipeline schedules for megatron-core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_bitpipe", "megatron_bitpipe.*"]),
    python_requires=">=3.10",
    install_requires=["pyyaml>=6"],  # configs (megatron-bitpipe launch, sweep, recommend)
    extras_require={
        # psutil: megatron-core's checkpoint writer (a save without it hangs in a child process)
        # triton: megatron-core 0.17+ (Python 3.12+) imports it even on a CPU
        "train": [
            "torch>=2.5",
            "megatron-core>=0.16.1,<0.20",
            "psutil",
            "triton; python_version >= '3.12' and platform_system == 'Linux'",
        ],
        "viz": ["matplotlib>=3.7"],
        # what Megatron-LM's megatron/training imports beyond megatron-core (docs/megatron-lm.md)
        "megatron-lm": ["six", "regex", "pyyaml", "pydantic"],
        "test": ["pytest>=7", "pyyaml>=6", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["megatron-bitpipe=megatron_bitpipe.cli:main"]},
    license="Apache-2.0",
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
