"""`python -m adapters_ds.mathdata synth|convert ...`: see `adapters_ds.cli.mathdata`."""

from adapters_ds.cli.mathdata import main

if __name__ == "__main__":
    main()
