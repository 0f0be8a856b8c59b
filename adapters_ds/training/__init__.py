"""A training run on DeepSpeed: its arguments (`args`, `recipes`), DeepSpeed config (`ds_config`), engine (`engine`,
`persistence`), data (`data`, `chat_data`, `packing`, `attention`), loss (`loss`), checkpoints (`checkpoint`,
`trainable_state`, `stop`) and the loop (`trainer`, `metrics`)."""
