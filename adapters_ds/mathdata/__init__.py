"""Training data from public sets: GSM8K and MAWPS converted into the LLM-Adapters training format
(`adapters_ds.mathdata.convert`), and the commonsense training mix of label tasks (`adapters_ds.mathdata.commonsense`).

    python -m adapters_ds.mathdata convert [--gsm8k FILE] [--mawps FILE] --out FILE
    python -m adapters_ds.mathdata synth --out FILE [--n N --seed S --split train|test]   (the built-in problems)
    python -m adapters_ds.mathdata commonsense --data_dir DIR --out FILE [--decontaminate]

The command lives in `adapters_ds.cli.mathdata`.
"""
