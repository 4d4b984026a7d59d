from setuptools import find_packages, setup

setup(
    name="distrib",
    version="0.1.0",
    description="Data-parallel PyTorch training on Horovod: launcher, checkpoints, elastic, SLURM",
    packages=find_packages(include=["distrib", "distrib.*", "launch", "launch.*"]),
    python_requires=">=3.9",
    # torch and horovod are installed by scripts/bootstrap.sh: torch must be pinned to the
    # right build (CPU or CUDA) and Horovod must be compiled against it.
    install_requires=["numpy"],
    entry_points={"console_scripts": ["distrib-launch=launch.__main__:main"]},
)
