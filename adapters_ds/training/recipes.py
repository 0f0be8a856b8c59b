"""Runs as recipes: `--config FILE`, a YAML or JSON mapping of training options by their flag names, or a run
folder's `train_args.json` (whose `"args"` are every option of that run), so a saved run repeats as it ran.

The file's options become command-line words placed before the real command line, so argparse checks their
types and choices as if they had been typed, and a flag typed on the command line wins (the last occurrence of an
option counts). An option the parser does not know is an `InputError` naming it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from adapters_ds.adapters.registry import METHODS, get_method
from adapters_ds.errors import InputError
from adapters_ds.records import json_type

CONFIG_FLAG = "--config"
# recorded in train_args.json but not options of a repeat: the config file the run was given (its options are in
# the record already) and the launcher's rank
SAVED_ONLY = ("config", "local_rank")


def config_path(argv: list[str]) -> str | None:
    """The value of the last `--config` in `argv` (as `--config FILE` or `--config=FILE`)."""
    found = None
    for i, word in enumerate(argv):
        if word == CONFIG_FLAG:
            if i + 1 >= len(argv):
                raise InputError(f"{CONFIG_FLAG}: expected a YAML or JSON file after it; found nothing")
            found = argv[i + 1]
        elif word.startswith(CONFIG_FLAG + "="):
            found = word.split("=", 1)[1]
    return found


def load_config(path: str) -> dict[str, Any]:
    """The options of a recipe file (YAML or JSON; JSON is YAML) or of a saved `train_args.json`."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"config: expected a YAML or JSON file; found no file {path!r}")
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise InputError(f"config {path!r}: expected YAML or JSON; found a syntax error{where}") from None
    except UnicodeDecodeError:
        raise InputError(f"config {path!r}: expected UTF-8 text; found undecodable bytes") from None
    if not isinstance(document, Mapping):
        raise InputError(f"config {path!r}: expected a mapping of option names to values; found {json_type(document)}")
    if isinstance(document.get("args"), Mapping) and "ds_config" in document:  # a run folder's train_args.json
        return saved_options(document["args"], path)
    if "config" in document:
        raise InputError(f"config {path!r}: a config cannot name another config; found 'config'")
    return dict(document)


def saved_options(saved: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The options a saved run repeats with: every recorded option but the method options of the methods the run
    did not use (recorded at their defaults; given back, each would be refused as not applying to --adapter). A
    record without its run's `adapter` is an InputError: which method options to keep depends on it."""
    if not isinstance(saved.get("adapter"), str):
        raise InputError(f"config {source!r}: expected the run's 'adapter' in 'args'; found {saved.get('adapter')!r}")
    adapter = get_method(saved["adapter"]).config
    own = {adapter.flag(f) for f in adapter.options()}
    others = {m.config.flag(f) for m in METHODS.values() for f in m.config.options()} - own
    return {k: v for k, v in saved.items() if k not in SAVED_ONLY and k not in others}


def config_words(parser: argparse.ArgumentParser, options: Mapping[str, Any], source: str) -> list[str]:
    """Command-line words for `options`: `--name value`, `--name`/`--no_name` for a boolean, lists joined with
    commas (`target_modules: [q_proj, v_proj]`); a null value leaves the option at its default."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.option_strings[0] == f"--{a.dest}"}
    words: list[str] = []
    for name, value in options.items():
        action = actions.get(name)
        if action is None or name == "config":
            raise InputError(
                f"config {source!r}: unknown option {name!r} (keys are the training flags without '--', "
                "e.g. learning_rate)"
            )
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise InputError(f"config {source!r}: option {name!r} expects true or false; found {value!r}")
            words.append(f"--{name}" if value else f"--no_{name}")
            continue
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, Mapping):
            raise InputError(f"config {source!r}: option {name!r} expects a value; found an object")
        words += [f"--{name}", json.dumps(value) if isinstance(value, bool) else str(value)]
    return words


def config_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with the options of its `--config` file (if any) in front, so those typed on the command line win."""
    path = config_path(argv)
    if path is None:
        return argv
    return [*config_words(parser, load_config(path), path), *argv]
