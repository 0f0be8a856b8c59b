"""A trained adapter for use outside adapters_ds: merged into the base weights (`merged`), in Hugging Face PEFT's
format (`peft`, `peft_prompts`), or folded and cut into a physically smaller model (`pruned`)."""
