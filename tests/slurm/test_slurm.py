"""The SLURM templates (slurm/), against a real SLURM and against stand-ins for its commands.

Real SLURM: munged, slurmctld and slurmd started on this machine by the `cluster` fixture; one node (this machine)
in CPU mode: `sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/llama13b_lora.sh` runs two
DeepSpeed ranks on the tiny LLaMA of tiny_models, with the recipe's flags overridden through EXTRA_ARGS the way a
user shortens a run. The chained evaluation gets no EVAL_SBATCH_ARGS: it must take the training job's CPU
allocation itself (eval.sh's own #SBATCH lines ask for GPUs). A preempted job requeues itself and resumes exactly;
another is given one task instead of two while it waits in the queue and resumes on one rank. Skipped where the
SLURM or MUNGE binaries are missing (`apt-get install slurm-wlm munge`) or the tests do not run as root (slurmd
starts jobs as their user).

Stand-ins (`srun`, `scontrol`, `sbatch` scripts that record their calls): what one machine cannot show, a two-node
GPU layout and the exit-code and signal decisions, in a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from launch import REPO, env, free_port, losses
from safetensors.torch import load_file
from tiny_models import make_model
from tiny_tokenizer import make_tokenizer

from adapters_ds.adapters.storage import WEIGHTS_NAME

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
CPU_ALLOCATION = ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10")
STEPS = 24  # enough that a signal sent after the first logged step lands well before the end
JOB_TIMEOUT = 900  # generous: a loaded machine slowed a 41 s job to 7 min


def _skip_reason() -> str | None:
    missing = [name for name in BINARIES if shutil.which(name, path=SEARCH_PATH) is None]
    if missing:
        return f"SLURM/MUNGE not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "a local slurmd must run as root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user to run munged as"
    return None


real_slurm = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


# ------------------------------------------------------------------------------------------------------ cluster


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]  # what clients (sbatch, scontrol, ...) need: SLURM_CONF
    jobs: list[int] = field(default_factory=list)

    def run(self, *args: str, cwd: Path | None = None, extra_env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            [shutil.which(args[0], path=SEARCH_PATH) or args[0], *args[1:]],
            env={**os.environ, **self.env, **(extra_env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}{self.logs()}")
        return result.stdout

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StartTime, ...)."""
        line = self.run("scontrol", "show", "job", "--oneliner", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def logs(self) -> str:
        tails = []
        for path in sorted((self.root / "log").glob("*.*")):  # the daemons' log files and their stdout
            tails.append(f"\n--- {path.name} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "".join(tails)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = JOB_TIMEOUT, context=lambda: "") -> float:
    """Seconds waited until `predicate()` held."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{context()}")
        time.sleep(0.2)
    return time.monotonic() - start


def _hostname() -> str:
    return socket.gethostname().split(".")[0]  # slurmd identifies its node by the short host name


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def _slurm_conf(root: Path, munge_socket: Path) -> str:
    host = _hostname()
    return f"""\
ClusterName=adapters-ds-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
# a private munged; a requeued job may start again cred_expire + 1 s after it stopped (default 120 s)
AuthInfo=socket={munge_socket},cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ReturnToService=2
MinJobAge=3600
# start a requeued job as soon as it is eligible again (the main scheduling loop runs every 60 s by default)
SchedulerParameters=sched_interval=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_memory_mb() // 2} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """munged, slurmctld and slurmd for this machine, from a generated config in a fresh folder; stopped at the
    end by the PIDs started here (after cancelling any job the tests left)."""
    root = Path(tempfile.mkdtemp(prefix="adapters-ds-slurm-"))  # outside pytest's 0700 tree: munged must reach it
    root.chmod(0o755)
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir()
    munge = pwd.getpwnam("munge")
    munge_dir, key = root / "munge", root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))  # a private key for a private munged
    key.chmod(0o600)
    for path in (munge_dir, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)
    munge_socket = munge_dir / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, munge_socket))
    cluster = Cluster(root=root, env={"SLURM_CONF": str(conf)})
    daemon_env = {**os.environ, **cluster.env}
    started: list[tuple[str, subprocess.Popen]] = []
    outputs = contextlib.ExitStack()

    def start(name: str, args: list[str], **kwargs) -> None:
        out = outputs.enter_context(open(root / "log" / f"{name}.out", "w"))  # noqa: SIM115 (ExitStack closes it)
        command = [shutil.which(name, path=SEARCH_PATH), *args]
        started.append((name, subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, **kwargs)))

    try:
        start(
            "munged",
            ["--foreground", f"--socket={munge_socket}", f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid",
             f"--seed-file={munge_dir}/munged.seed", f"--log-file={root}/log/munged.log"],
            user=munge.pw_uid, group=munge.pw_gid, extra_groups=[],
        )  # fmt: skip
        wait_until(munge_socket.exists, "munged's socket", timeout=30, context=cluster.logs)
        start("slurmctld", ["-D", "-f", str(conf)], env=daemon_env)
        start("slurmd", ["-D", "-f", str(conf)], env=daemon_env)
        for name, proc in started:
            assert proc.poll() is None, f"{name} exited with {proc.returncode}{cluster.logs()}"

        def node_idle() -> bool:
            try:
                return cluster.run("sinfo", "--noheader", "--format=%T").split() == ["idle"]
            except AssertionError:
                return False  # slurmctld not listening yet

        wait_until(node_idle, "the node to be idle in sinfo", timeout=60, context=cluster.logs)
        yield cluster
    finally:
        if cluster.jobs and len(started) == 3:
            with contextlib.suppress(AssertionError):  # the daemons are stopped below either way
                cluster.run("scancel", *map(str, cluster.jobs))
                wait_until(lambda: not cluster.run("squeue", "--noheader").strip(), "jobs to end", timeout=60)
        for _, proc in reversed(started):
            _stop(proc)
        outputs.close()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ jobs


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny LLaMA with its tokenizer, a toy training set, and an evaluation folder (Toy/test.json)."""
    root = tmp_path_factory.mktemp("slurm-jobs")
    make_model("llama").save_pretrained(root / "base")
    make_tokenizer().save_pretrained(root / "base")
    rng = random.Random(0)
    pairs = [(rng.randint(1, 9), rng.randint(1, 9)) for _ in range(96)]
    records = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} + {b} = {a + b}."}
               for a, b in pairs]  # fmt: skip
    (root / "data.json").write_text(json.dumps(records))
    (root / "eval" / "Toy").mkdir(parents=True)
    tests = [{**r, "answer": str(a + b)} for r, (a, b) in zip(records[:6], pairs[:6], strict=True)]
    (root / "eval" / "Toy" / "test.json").write_text(json.dumps(tests))
    return root


@dataclass
class Job:
    id: int
    output: Path  # the training OUTPUT folder
    log: Path  # the job's %x-%j.out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no job log yet)"


def submit_lora(cluster: Cluster, assets: Path, name: str, **overrides: str) -> Job:
    """`sbatch slurm/llama13b_lora.sh` in CPU mode, pointed at the tiny model and data, shortened to STEPS steps."""
    out = assets / name
    settings = {
        "MODEL": str(assets / "base"),
        "DATA": str(assets / "data.json"),
        "OUTPUT": str(out),
        "PYTHON": sys.executable,
        "BATCH_SIZE": "8",
        "MICRO_BATCH_SIZE": "4",
        "EXTRA_ARGS": f"--max_steps {STEPS} --cutoff_len 48 --lora_r 4 --lora_alpha 8 --learning_rate 2e-2 "
        "--lr_scheduler constant --val_set_size 0 --logging_steps 4 --seed 7",
        "EVAL_DATA": str(assets / "eval"),
        "EVAL_DATASETS": "Toy",
        "EVAL_ARGS": "--max_new_tokens 8 --batch_size 2",
        **overrides,
    }
    script = REPO / "slurm" / "llama13b_lora.sh"
    submitted = cluster.run(
        "sbatch", "--parsable", *CPU_ALLOCATION, str(script), cwd=assets, extra_env={**env(), **settings}
    )
    job_id = int(submitted.strip().split(";")[0])
    cluster.jobs.append(job_id)
    return Job(job_id, out, assets / f"llama13b-lora-{job_id}.out")


def wait_for_end(cluster: Cluster, job: Job, state: str = "COMPLETED") -> dict[str, str]:
    """Waits for the job to leave the queue for good (a requeued job passes through PENDING again)."""
    ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
    wait_until(lambda: cluster.job(job.id)["JobState"] in ended, f"job {job.id} to end", context=job.log_text)
    info = cluster.job(job.id)
    assert info["JobState"] == state, f"job {job.id}: {info['JobState']} {info['ExitCode']}\n{job.log_text()[-6000:]}"
    return info


def seconds(info: dict[str, str], start: str = "StartTime", end: str = "EndTime") -> int:
    parse = lambda stamp: time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))  # noqa: E731
    return round(parse(info[end]) - parse(info[start]))


def complete_steps(output: Path) -> list[int]:
    root = output / "checkpoints"
    found = root.glob("step-*/complete.json") if root.is_dir() else []
    return sorted(int(path.parent.name.removeprefix("step-")) for path in found)


def log_lines(output: Path) -> int:
    path = output / "train_log.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def adapter_tensors(output: Path) -> dict[str, torch.Tensor]:
    return load_file(output / "adapter" / WEIGHTS_NAME)


# ------------------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def straight(cluster, assets) -> tuple[Job, dict[str, str]]:
    """An uninterrupted training job, which chains its evaluation."""
    job = submit_lora(cluster, assets, "straight")
    return job, wait_for_end(cluster, job)


@pytest.mark.slow
@real_slurm
def test_training_job_saves_the_adapter_and_chains_the_evaluation(cluster, straight):
    job, info = straight
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    assert len(losses(job.output)) == STEPS
    assert (job.output / "adapter" / "adapter_config.json").is_file()
    assert set(adapter_tensors(job.output)) and (job.output / "tensorboard" / f"llama13b-lora-{job.id}").is_dir()
    record = job.output / "slurm" / f"job-{job.id}"
    command = (record / "command.sh").read_text()
    assert command.startswith("srun ") and "--resume auto" in command and f"MASTER_PORT={15000 + job.id}" in command
    assert f"command: {command.strip()}" in job.log_text()  # the exact command is logged

    eval_id = int((record / "eval_job").read_text())
    eval_job = Job(eval_id, job.output / "eval", job.output / "eval" / f"llama13b-lora-eval-{eval_id}.out")
    assert f"--dependency=afterok:{job.id}" in job.log_text()
    # no EVAL_SBATCH_ARGS: the training job's allocation, not eval.sh's 4 GPUs per node, which this cluster lacks
    assert "--nodes=1 --ntasks-per-node=2 --gpus-per-node=0 --cpus-per-task=1 --partition=debug" in job.log_text()
    eval_info = wait_for_end(cluster, eval_job)
    assert (eval_info["NumNodes"], eval_info["NumTasks"], eval_info["NumCPUs"]) == ("1", "2", "2")
    summary = json.loads((job.output / "eval" / "summary.json").read_text())
    assert "Toy" in json.dumps(summary) and (job.output / "eval" / "summary.md").is_file()
    assert "evaluation done" in eval_job.log_text()  # its log beside its results
    assert not job.log.with_name(eval_job.log.name).exists()
    assert eval_info["StartTime"] >= info["EndTime"]  # it waited for the training job to end
    print(
        f"\ntraining job {job.id}: {info['JobState']} {info['ExitCode']} in {seconds(info)} s; "
        f"evaluation job {eval_id}: {eval_info['JobState']} {eval_info['ExitCode']} in {seconds(eval_info)} s"
    )


def preempt(cluster: Cluster, job: Job, run: int, how: list[str], timeline: list[str]) -> int:
    """Once run `run` of the job has trained a step of its own, `scancel <how> job`; returns the checkpoint's step."""
    resumed_at = complete_steps(job.output)[-1] if run else 0

    def training() -> bool:
        info = cluster.job(job.id)
        return info["JobState"] == "RUNNING" and info["Restarts"] == str(run) and log_lines(job.output) > resumed_at

    waited = wait_until(training, f"run {run} of job {job.id} to train", context=job.log_text)
    cluster.run("scancel", *how, str(job.id))
    waited += wait_until(lambda: len(complete_steps(job.output)) > run, "a checkpoint", context=job.log_text)
    step = complete_steps(job.output)[-1]
    timeline.append(f"{waited:.0f} s later: scancel {' '.join(how)} → checkpoint at step {step}, requeued")
    return step


@pytest.mark.slow
@real_slurm
def test_preempted_job_requeues_itself_and_resumes_exactly(cluster, assets, straight):
    """SIGUSR1 twice, the two ways SLURM delivers it: to the job's steps (`scancel --signal=USR1`, as
    `--signal=USR1@120` does before the time limit) and to the batch shell only (`scancel --batch`, as
    `--signal=B:USR1@...`), which relays it to the ranks. Each time every rank finishes its step, checkpoints and
    exits 75, the script requeues the job, and the next run resumes: the same losses and adapter as straight."""
    reference, _ = straight
    job = submit_lora(cluster, assets, "preempted", CHAIN_EVAL="0")
    timeline = [f"job {job.id} submitted"]
    stops: list[int] = []
    for run, how in enumerate((["--signal=USR1"], ["--batch", "--signal=USR1"])):
        stops.append(preempt(cluster, job, run, how, timeline))
    assert 0 < stops[0] < stops[1] < STEPS, f"the signals landed at steps {stops} of {STEPS}"

    info = wait_for_end(cluster, job)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "2"
    text = job.log_text()
    assert text.count("requeueing job") == 2 and "batch shell got SIGUSR1: relaying it to the ranks" in text
    assert [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", text)] == stops
    assert losses(job.output) == pytest.approx(losses(reference.output), abs=1e-6)
    resumed, straight_adapter = adapter_tensors(job.output), adapter_tensors(reference.output)
    assert set(resumed) == set(straight_adapter)
    for name, tensor in straight_adapter.items():
        torch.testing.assert_close(resumed[name].float(), tensor.float(), atol=1e-6, rtol=0)
    timeline.append(
        f"{info['JobState']} {info['ExitCode']} after {info['Restarts']} restarts; last run {seconds(info)} s"
    )
    print("\n" + "; ".join(timeline))


@pytest.mark.slow
@real_slurm
def test_requeued_job_resumes_on_the_ranks_of_its_new_allocation(cluster, assets, straight):
    """A job of two tasks checkpoints on SIGUSR1 and requeues itself; held in the queue, it is given one task per node
    instead of two (what a requeue onto a smaller allocation does) and released. Its next run lays itself out on
    the new allocation (one rank), resumes from the 2-rank checkpoint and finishes: the same losses as the straight
    job up to the interruption, and close to them after. Close, not equal: on one rank the shipped bf16 config rounds
    differently. That a resume on another number of ranks computes exactly what that layout would is
    tests/training/test_resume_world_size.py's (fp32)."""
    reference, _ = straight
    job = submit_lora(cluster, assets, "reshaped", CHAIN_EVAL="0")
    timeline = [f"job {job.id} submitted with 2 tasks"]
    stop = preempt(cluster, job, 0, ["--signal=USR1"], timeline)
    # back in the queue it would start again cred_expire + 1 s later: hold it there first
    wait_until(lambda: cluster.job(job.id)["Restarts"] == "1", f"job {job.id} to requeue", context=job.log_text)
    cluster.run("scontrol", "hold", str(job.id))
    assert cluster.job(job.id)["JobState"] == "PENDING", "the requeued job restarted before it could be held"
    cluster.run("scontrol", "update", f"JobId={job.id}", "NumTasks=1", "TasksPerNode=1", "MinCPUsNode=1", "NumCPUs=1")
    cluster.run("scontrol", "release", str(job.id))
    timeline.append("held, given 1 task per node, released")

    info = wait_for_end(cluster, job)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "1" and info["NumTasks"] == "1"
    text = job.log_text()
    assert "1 node(s) × 2 rank(s) = 2" in text and "1 node(s) × 1 rank(s) = 1" in text
    assert f"resumed from {job.output / 'checkpoints' / f'step-{stop}'} at step {stop} on 1 rank(s)" in text
    got, expected = losses(job.output), losses(reference.output)
    assert len(got) == STEPS
    assert got[:stop] == pytest.approx(expected[:stop], abs=1e-6)
    assert got[stop:] == pytest.approx(expected[stop:], abs=2e-2), (got, expected)
    resumed, straight_adapter = adapter_tensors(job.output), adapter_tensors(reference.output)
    assert set(resumed) == set(straight_adapter)
    timeline.append(
        f"{info['JobState']} {info['ExitCode']} on 1 rank; largest loss difference to the straight job after step "
        f"{stop}: {max(abs(a - b) for a, b in zip(got[stop:], expected[stop:], strict=True)):.2e} (losses: step 1 "
        f"{expected[0]:.4f}, step {stop} {expected[stop - 1]:.4f}, last {expected[-1]:.4f})"
    )
    print("\n" + "; ".join(timeline))


# ------------------------------------------------------------------------------------------------------ stand-ins

STUBS = {
    "scontrol": """#!/bin/bash
echo "scontrol $*" >>"$CALLS"
case "$1 $2" in
"show hostnames") printf '%s\\n' node01 node02 ;;
"show job") echo "   Command=$STUB_REPO/slurm/llama13b_lora.sh" ;;
esac
""",
    "srun": """#!/bin/bash
echo "srun $*" >>"$CALLS"
sleep "${FAKE_SECONDS:-0}"
exit "${FAKE_RC:-0}"
""",
    "sbatch": """#!/bin/bash
echo "sbatch $* | inherited: $(env | grep -c '^SLURM_') SLURM_* variables, MASTER_ADDR=${MASTER_ADDR:-}" >>"$CALLS"
echo 99
""",
}


@pytest.fixture
def stubs(tmp_path) -> dict[str, str]:
    """The environment of a batch script in job 1234 on two nodes with 4 GPUs each, under stand-in commands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "eval").mkdir()
    (tmp_path / "data.json").write_text("[]")
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "CALLS": str(tmp_path / "calls.txt"),
        "STUB_REPO": str(REPO),
        "SLURM_JOB_ID": "1234",
        "SLURM_JOB_NAME": "llama13b-lora",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_GPUS_PER_NODE": "a100:4",
        "SLURM_CPUS_PER_TASK": "8",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_PARTITION": "gpu",
        "DATA": str(tmp_path / "data.json"),
        "OUTPUT": str(tmp_path / "run"),
        "EVAL_DATA": str(tmp_path / "eval"),
        "PYTHON": sys.executable,
    }


def run_script(stubs: dict[str, str], script: str = "llama13b_lora.sh", **overrides: str):
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / script)], env={**stubs, **overrides}, capture_output=True, text=True, timeout=60
    )
    calls = Path(stubs["CALLS"]).read_text().splitlines() if Path(stubs["CALLS"]).exists() else []
    return result, [call for call in calls if not call.startswith("scontrol show")]


def test_two_gpu_nodes_one_rank_per_gpu_and_one_evaluation(stubs):
    result, calls = run_script(stubs)
    assert result.returncode == 0, result.stdout + result.stderr
    srun, sbatch = calls
    assert srun.startswith(
        "srun --nodes=2 --ntasks-per-node=4 --ntasks=8 --cpus-per-task=8 --kill-on-bad-exit=0 --wait=120 "
    )
    assert "MASTER_ADDR=node01,MASTER_PORT=16234," in srun and "DS_ACCELERATOR" not in srun  # 15000 + 1234
    assert "--batch_size 16 --micro_batch_size 2 --resume auto" in srun  # 8 ranks: micro-batch 4 → 2, global 16
    run = Path(stubs["OUTPUT"])
    config = json.loads((run / "slurm" / "job-1234" / "ds_config.json").read_text())
    assert config["tensorboard"] == {"enabled": True, "output_path": str(run / "tensorboard"),
                                     "job_name": "llama13b-lora-1234"}  # fmt: skip
    assert f"--ds_config {run}/slurm/job-1234/ds_config.json" in srun
    assert sbatch.startswith("sbatch --parsable --dependency=afterok:1234 --kill-on-invalid-dep=yes ")
    assert sbatch.endswith("slurm/eval.sh | inherited: 0 SLURM_* variables, MASTER_ADDR=")
    # the training job's allocation shape, and its log beside its results
    assert f"--output={run}/eval/%x-%j.out --nodes=2 --ntasks-per-node=4 --gpus-per-node=a100:4 --cpus-per-task=8 " \
           "--partition=gpu " in sbatch  # fmt: skip
    assert (run / "eval").is_dir() and (run / "slurm" / "job-1234" / "eval_job").read_text() == "99\n"

    again, calls = run_script(stubs)  # the same job, requeued after it had submitted its evaluation
    assert again.returncode == 0 and [call.split()[0] for call in calls] == ["srun", "sbatch", "srun"]
    assert "evaluation job 99 was submitted by an earlier run of this job: not again" in again.stdout


def test_a_requeued_job_takes_the_shape_of_its_new_allocation(stubs):
    """In a requeued job whose allocation changed, SLURM_NTASKS_PER_NODE, SLURM_NTASKS and SLURM_GPUS_PER_NODE keep
    the submission's values; the layout follows what this run got, and EVAL_SBATCH_ARGS still win over it."""
    result, calls = run_script(
        stubs, SLURM_TASKS_PER_NODE="2(x2)", SLURM_GPUS_ON_NODE="2", SLURM_NTASKS="8", SLURM_RESTART_COUNT="1",
        EVAL_SBATCH_ARGS="--gpus-per-node=1 --ntasks-per-node=1 --time=30",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    srun, sbatch = calls
    assert (
        srun.startswith("srun --nodes=2 --ntasks-per-node=2 --ntasks=4 ")
        and "--batch_size 16 --micro_batch_size 4" in srun
    )
    assert "--nodes=2 --ntasks-per-node=2 --gpus-per-node=2 --cpus-per-task=8 --partition=gpu " \
           "--gpus-per-node=1 --ntasks-per-node=1 --time=30 " in sbatch  # fmt: skip

    Path(stubs["CALLS"]).unlink()
    result, calls = run_script(stubs, SLURM_TASKS_PER_NODE="4,2")
    assert result.returncode == 2 and "different numbers of tasks (SLURM_TASKS_PER_NODE=4,2)" in result.stderr
    assert not calls


@pytest.mark.parametrize(
    "ranks_exit,restarts,script_exit,requeued",
    [(0, "0", 0, False), (75, "0", 75, True), (75, "20", 75, False), (1, "0", 2, False)],
    ids=["done", "checkpointed", "too-many-requeues", "failed"],
)
def test_exit_code_of_the_ranks_decides_the_requeue(stubs, ranks_exit, restarts, script_exit, requeued):
    result, calls = run_script(stubs, FAKE_RC=str(ranks_exit), SLURM_RESTART_COUNT=restarts)
    assert result.returncode == script_exit, result.stdout + result.stderr
    assert ("scontrol requeue 1234" in calls) == requeued
    assert any(call.startswith("sbatch") for call in calls) == (ranks_exit == 0)


def test_sigterm_to_the_batch_shell_is_a_cancel_not_a_requeue(stubs):
    """scancel, preemption and the time limit SIGTERM the batch shell too: the ranks still checkpoint and exit 75,
    but requeueing would undo the user's scancel."""
    script = str(REPO / "slurm" / "llama13b_lora.sh")
    proc = subprocess.Popen(
        ["bash", script], env={**stubs, "FAKE_RC": "75", "FAKE_SECONDS": "2"}, stdout=subprocess.PIPE, text=True
    )
    calls = Path(stubs["CALLS"])
    wait_until(lambda: calls.exists() and "srun" in calls.read_text(), "srun to start", timeout=30)
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75, out
    assert "SLURM is ending the job" in out and "not requeueing" in out
    assert "scontrol requeue" not in calls.read_text()


@pytest.mark.parametrize(
    "overrides,message",
    [({"GPUS_PER_NODE": "8"}, "8 GPUs per node need --ntasks-per-node=8, the allocation has 4 task(s) per node"),
     ({"BATCH_SIZE": "12"}, "BATCH_SIZE=12 is not a multiple of the 8 ranks"),
     ({"EVAL_DATA": "/nonexistent"}, "EVAL_DATA=/nonexistent is not a folder"),
     ({"DATA": "/nonexistent.json"}, "DATA=/nonexistent.json does not exist"),
     ({"SLURM_JOB_ID": ""}, "not inside a SLURM job")],
)  # fmt: skip
def test_bad_settings_fail_before_launching(stubs, overrides, message):
    result, calls = run_script(stubs, **overrides)
    assert result.returncode == 2 and message in result.stderr, result.stdout + result.stderr
    assert not calls
