"""Fine-tune a causal LM with an adapter on DeepSpeed: see `adapters_ds/cli/train.py`.

    deepspeed [--num_gpus N] launcher/train.py --ds_config ds_configs/zero3.json [--base_model M --data_path D ...]

With no model and no data it trains the embedded SmolLM2-135M-Instruct on built-in arithmetic problems and
prints the accuracy gain on their held-out split.
"""

from adapters_ds.cli.train import main

if __name__ == "__main__":
    main()
