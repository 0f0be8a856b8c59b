"""Evaluate a base model (plus a trained adapter) on math benchmarks; see adapters_ds/cli/evaluate.py.

python launcher/evaluate.py --base_model B [--adapter_dir A] --datasets AddSub,gsm8k --data_dir D --output_dir O
deepspeed --num_gpus N launcher/evaluate.py ...   (or torchrun / srun / mpirun): each rank generates a share
"""

from adapters_ds.cli.evaluate import main

if __name__ == "__main__":
    main()
