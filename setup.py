from pathlib import Path

from setuptools import find_packages, setup

version = {}
exec(Path(__file__).with_name("dapt").joinpath("version.py").read_text(), version)

setup(
    name="dapt",
    version=version["__version__"],
    description="Distributed domain-adaptive pretraining (MLM) and fine-tuning of BERT on DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Every subpackage has an __init__.py (tests/test_packaging.py checks the wheel holds every module);
    # the DeepSpeed configs and recipes ship inside the package, found by name (dapt/configs/).
    packages=find_packages(include=["dapt", "dapt.*"]),
    package_data={"dapt.configs": ["ds/*.json", "recipes/*.yaml"]},
    install_requires=[
        # Lower bounds found by installing each release and running the tests (`make test-lowest`,
        # constraints/lowest.txt; the bisect is in docs/dependencies.md).
        # torch: the only release tested (2.13.0, the Makefile's CPU pin); older builds were not installed.
        "torch>=2.13",
        # deepspeed: 0.14.0 does not import with torch 2.13 (torch.distributed.elastic `log`); 0.15.x fails to
        # resume (torch.load weights_only); 0.16.0 passes, a 2-rank ZeRO-2 run included.
        "deepspeed>=0.16",
        # transformers: 5.0 is the first whose BERT takes a registered attention function (4.57.6 fails with
        # KeyError: 'dapt_auto'); 5.0.0 leaves MLM weights untied on the meta device (dapt plan counts the
        # decoder twice: tests/test_config.py fails); 5.1.0 passes.
        "transformers>=5.1",
        # datasets: 2.19/2.20 fail under numpy 2 (copy=False in the numpy formatter); 2.21.0 passes.
        "datasets>=2.21",
        "safetensors",
        "numpy",
        "scipy>=1.13",  # dapt/eval/stats.py: betainccinv is 1.12+; 1.13.1 is the oldest that passes tests/test_stats.py
        "pyyaml",
        "tqdm",  # the progress bar in a terminal
        "matplotlib",  # dapt report
    ],
    extras_require={
        # selenium: the demo page in headless Chromium; accelerate: the HF Trainer arm of the gpu_speed smoke test;
        # pytest-xdist: `make test` and `make test-fast` run two workers (3.8: --no-loadscope-reorder)
        "test": ["pytest>=7", "pytest-xdist>=3.8", "scikit-learn", "selenium", "accelerate"],
        "mpi": ["mpi4py"],
        "wandb": ["wandb"],
        "demo": ["gradio"],  # dapt demo: the Gradio page
        "bench": ["accelerate", "pandas"],  # the HF Trainer reference side of benchmarks/
    },
    entry_points={"console_scripts": ["dapt=dapt.cli:main"]},
)
