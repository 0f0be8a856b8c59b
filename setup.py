"""adapters_ds: parameter-efficient fine-tuning (LoRA, Series, Parallel, gates) of LLMs on DeepSpeed."""

from setuptools import find_packages, setup

setup(
    name="adapters_ds",
    version="0.1.0",
    description="Parameter-efficient fine-tuning of large language models on DeepSpeed",
    packages=find_packages(include=["adapters_ds", "adapters_ds.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is pinned loosely on purpose: install the build for your machine first
        # (CPU wheel or CUDA wheel); a range admits whatever is already there.
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=5.23",  # boolean logits_to_keep and packed-sequence masks (adapters_ds/loss.py, packing.py)
        "datasets>=3.0",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "tqdm>=4.66",
        "pyyaml>=6.0",  # --config recipe files
    ],
    extras_require={
        "test": ["pytest>=8", "peft>=0.17", "ruff>=0.6"],
        "mpi": ["mpi4py>=3.1"],
        "demo": ["gguf>=0.10", "accelerate>=1.0"],
        "quant": ["bitsandbytes>=0.47"],  # --quantization (its CPU path: 4-bit since 0.47)
        "wandb": ["wandb>=0.19"],  # --report_to wandb (DeepSpeed's W&B monitor)
    },
    entry_points={
        "console_scripts": [
            "adapters-ds-train=adapters_ds.cli.train:main",
            "adapters-ds-evaluate=adapters_ds.cli.evaluate:main",
            "adapters-ds-export=adapters_ds.cli.export:main",
            "adapters-ds-mathdata=adapters_ds.cli.mathdata:main",
        ]
    },
)
