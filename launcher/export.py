"""Export a trained adapter (PEFT format, merged, or pruned): see `adapters_ds/cli/export.py`.

python launcher/export.py --base_model B --adapter_dir A --output_dir O --peft|--merge|--prune [--uniform_shapes]
"""

from adapters_ds.cli.export import main

if __name__ == "__main__":
    main()
