"""The main job out of the box: the embedded default model (`default_model`), the built-in problems (`problems`) and
the gain report (`gain`); the demo's defaults live only here."""
