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
        # Upper bounds where the code relies on private APIs, below the first release not yet tested: DeepSpeed's
        # ZeRO-3 parameter internals (zero.py, training/trainable_state.py) and AutoTP layers
        # (evaluation/tensor_parallel.py); transformers' `_flash_attention_forward` and attention/mask interfaces
        # (training/attention.py, adapters/prefix.py). .ci/constraints.txt pins the versions CI tests.
        "deepspeed>=0.16,<0.20",
        "transformers>=5.23,<5.26",  # >=: boolean logits_to_keep and packed-sequence masks (loss.py, packing.py)
        "datasets>=3.0",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "tqdm>=4.66",
        "pydantic>=2",  # DeepSpeed's config validation errors (training/ds_config.py)
        "filelock>=3.12",  # one rank converts the embedded model while the others wait (demo/default_model.py)
        "pyyaml>=6.0",  # --config recipe files
        "jinja2>=3.1",  # chat templates: transformers renders them with it, training/chat_data.py catches its errors
    ],
    extras_require={
        "test": ["pytest>=8", "peft>=0.17", "ruff>=0.6", "tokenizers>=0.20", "packaging>=23"],
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
