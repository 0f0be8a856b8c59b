"""The commands: argument parsing, the exit-code convention (0 ok, 2 bad input with one `error: ...` line) and what
a user's terminal shows. `launcher/*.py` and the console scripts call these `main` functions."""
