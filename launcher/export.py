"""Export a trained adapter.

python launcher/export.py --base_model B --adapter_dir A --output_dir O --peft|--merge|--prune [--uniform_shapes]
"""

from adapters_ds.export import main

if __name__ == "__main__":
    main()
