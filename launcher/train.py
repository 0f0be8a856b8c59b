"""Fine-tune a causal LM with an adapter on DeepSpeed.

deepspeed [--num_gpus N] launcher/train.py --ds_config ds_configs/zero3.json [--base_model M --data_path D ...]
"""

from adapters_ds.errors import run_main
from adapters_ds.train_args import parse_train_args
from adapters_ds.trainer import train

if __name__ == "__main__":
    run_main(lambda: train(parse_train_args()))
