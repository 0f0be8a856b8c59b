"""A real SLURM cluster on this machine for the template tests, and the jobs they submit.

One munged, one slurmctld and three slurmd from a generated configuration in a fresh folder:
- this machine's own node (its host name, 127.0.0.1, all its CPUs) in the default partition `debug`;
- two more "nodes" `n1` and `n2` in the partition `pair`, one CPU each: each slurmd runs in its own UTS namespace
  (`unshare --uts`), so its jobs see their node's host name, with its own port and its own address (127.0.0.2,
  127.0.0.3). The ranks meet at the job's first node by name, so `n1` and `n2` must resolve: lines added to
  /etc/hosts for the session and removed again at its end (only those lines, under a lock; the rest of the file is
  left as it was).
Everything started is stopped by its PID at the end, after cancelling any job the tests left. Runs as root (slurmd
starts jobs as their user); `skip_reason()` says why it cannot start here.
"""

from __future__ import annotations

import contextlib
import fcntl
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

import torch
from launch import REPO, env, free_port
from safetensors.torch import load_file
from tiny_models import make_model
from tiny_tokenizer import make_tokenizer

from adapters_ds.adapters.storage import WEIGHTS_NAME

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "unshare")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
PAIR = {"n1": "127.0.0.2", "n2": "127.0.0.3"}  # the two-node partition: host name → address
HOSTS_FILE = Path("/etc/hosts")
STEPS = 24  # enough that a signal sent after the first logged step lands well before the end
EXTRA_ARGS = (
    f"--max_steps {STEPS} --cutoff_len 48 --lora_r 4 --lora_alpha 8 --learning_rate 2e-2 --lr_scheduler constant "
    "--val_set_size 0 --logging_steps 4 --seed 7"
)  # the trainer flags of every job here, after the recipe's: the way a user shortens a run
JOB_TIMEOUT = 900  # generous: a loaded machine slowed a 41 s job to 7 min
CPU_MODE = ("--gpus-per-node=0", "--cpus-per-task=1", "--time=10")
ONE_NODE = ("--nodes=1", "--ntasks-per-node=2", *CPU_MODE)  # this machine's node (partition debug)
TWO_NODES = ("--partition=pair", "--nodes=2", "--ntasks-per-node=1", *CPU_MODE)  # n1 and n2
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def skip_reason() -> str | None:
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


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]  # what clients (sbatch, scontrol, ...) need: SLURM_CONF
    jobs: list[int] = field(default_factory=list)
    pair_daemons: dict[str, int] = field(default_factory=dict)  # node name → PID of its slurmd (its UTS namespace)

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
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StartTime, NodeList, ...)."""
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
    host, memory = _hostname(), _memory_mb() // 4
    pair = "\n".join(
        f"NodeName={name} NodeHostname={name} NodeAddr={address} Port={free_port()} CPUs=1 RealMemory={memory} "
        "State=UNKNOWN"
        for name, address in PAIR.items()
    )
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
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ReturnToService=2
MinJobAge=3600
# job ids (and with them the rendezvous ports, 15000 + id) apart from another test session's cluster
FirstJobId={random.randrange(1000, 10000, 1000)}
# start a requeued job as soon as it is eligible again (the main scheduling loop runs every 60 s by default)
SchedulerParameters=sched_interval=1
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN
{pair}
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=pair Nodes={",".join(PAIR)} MaxTime=INFINITE State=UP
"""


def _edit_hosts(change: Callable[[list[str]], list[str]]) -> None:
    """Rewrites /etc/hosts in place (it may be a mount point, which a rename would fail on) under an exclusive lock,
    so that two test sessions editing it at once do not lose each other's lines."""
    with open(HOSTS_FILE, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        lines = f.read().splitlines()
        f.seek(0)
        f.write("".join(f"{line}\n" for line in change(lines)))
        f.truncate()


@contextlib.contextmanager
def resolvable(names: dict[str, str]) -> Iterator[None]:
    """`names` (host name → address) resolve for the duration: lines of our own, marked, in /etc/hosts."""
    marker = f"# adapters-ds test cluster {os.getpid()}"
    ours = [f"{address} {name} {marker}" for name, address in names.items()]
    _edit_hosts(lambda lines: [*lines, *ours])
    try:
        for name, address in names.items():
            found = socket.gethostbyname(name)
            assert found == address, f"{name} resolves to {found}, not {address}: another entry in {HOSTS_FILE}?"
        yield
    finally:
        _edit_hosts(lambda lines: [line for line in lines if not line.endswith(marker)])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def start_cluster() -> Iterator[Cluster]:
    """munged, slurmctld and the three slurmd; stopped at the end by the PIDs started here."""
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

    def start(name: str, command: list[str], **kwargs) -> None:
        out = outputs.enter_context(open(root / "log" / f"{name}.out", "w"))  # noqa: SIM115 (ExitStack closes it)
        started.append((name, subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, **kwargs)))

    def binary(name: str) -> str:
        return str(shutil.which(name, path=SEARCH_PATH))

    try:
        outputs.enter_context(resolvable(PAIR))
        start(
            "munged",
            [binary("munged"), "--foreground", f"--socket={munge_socket}", f"--key-file={key}",
             f"--pid-file={munge_dir}/munged.pid", f"--seed-file={munge_dir}/munged.seed",
             f"--log-file={root}/log/munged.log"],
            user=munge.pw_uid, group=munge.pw_gid, extra_groups=[],
        )  # fmt: skip
        wait_until(munge_socket.exists, "munged's socket", timeout=30, context=cluster.logs)
        start("slurmctld", [binary("slurmctld"), "-D", "-f", str(conf)], env=daemon_env)
        start("slurmd", [binary("slurmd"), "-D", "-f", str(conf)], env=daemon_env)
        for name in PAIR:  # its own host name: `unshare` and `sh` exec, so the PID started is slurmd's
            slurmd = f"hostname {name} && exec {binary('slurmd')} -D -f {conf}"
            start(f"slurmd-{name}", [binary("unshare"), "--uts", "sh", "-c", slurmd], env=daemon_env)
            cluster.pair_daemons[name] = started[-1][1].pid
        for name, proc in started:
            assert proc.poll() is None, f"{name} exited with {proc.returncode}{cluster.logs()}"

        def nodes_idle() -> bool:
            try:
                return cluster.run("sinfo", "--noheader", "--Node", "--format=%T").split() == ["idle"] * 3
            except AssertionError:
                return False  # slurmctld not listening yet

        wait_until(nodes_idle, "the nodes to be idle in sinfo", timeout=60, context=cluster.logs)
        yield cluster
    finally:
        if cluster.jobs and len(started) == 3 + len(PAIR):
            with contextlib.suppress(AssertionError):  # the daemons are stopped below either way
                cluster.run("scancel", *map(str, cluster.jobs))
                wait_until(lambda: not cluster.run("squeue", "--noheader").strip(), "jobs to end", timeout=60)
        for _, proc in reversed(started):
            _stop(proc)
        outputs.close()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ jobs


def make_assets(root: Path) -> None:
    """A tiny LLaMA with its tokenizer, a toy training set, an evaluation folder (Toy/test.json) and the shipped
    ZeRO-3 config in fp32 (`fp32.json`): the same numbers on every processor, so runs of different layouts can be
    compared exactly."""
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
    config = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    config["bf16"] = {"enabled": False}
    (root / "fp32.json").write_text(json.dumps(config))


@dataclass
class Job:
    id: int
    output: Path  # the training OUTPUT folder
    log: Path  # the job's %x-%j.out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no job log yet)"


def lora_settings(assets: Path, name: str, **overrides: str) -> dict[str, str]:
    """The environment of `sbatch slurm/llama13b_lora.sh` pointed at the tiny model and data, shortened to STEPS
    steps; `overrides` win."""
    return {
        **env(),
        "MODEL": str(assets / "base"),
        "DATA": str(assets / "data.json"),
        "OUTPUT": str(assets / name),
        "PYTHON": sys.executable,
        "BATCH_SIZE": "8",
        "MICRO_BATCH_SIZE": "4",
        "EXTRA_ARGS": EXTRA_ARGS,
        "EVAL_DATA": str(assets / "eval"),
        "EVAL_DATASETS": "Toy",
        "EVAL_ARGS": "--max_new_tokens 8 --batch_size 2",
        **overrides,
    }


def submit_lora(cluster: Cluster, assets: Path, name: str, allocation: tuple[str, ...], **overrides: str) -> Job:
    """`sbatch <allocation> slurm/llama13b_lora.sh` in the settings of `lora_settings`."""
    script = REPO / "slurm" / "llama13b_lora.sh"
    settings = lora_settings(assets, name, **overrides)
    submitted = cluster.run("sbatch", "--parsable", *allocation, str(script), cwd=assets, extra_env=settings)
    job_id = int(submitted.strip().split(";")[0])
    cluster.jobs.append(job_id)
    return Job(job_id, Path(settings["OUTPUT"]), assets / f"llama13b-lora-{job_id}.out")


def wait_for_end(cluster: Cluster, job: Job, state: str = "COMPLETED") -> dict[str, str]:
    """Waits for the job to leave the queue for good (a requeued job passes through PENDING again)."""
    wait_until(lambda: cluster.job(job.id)["JobState"] in ENDED, f"job {job.id} to end", context=job.log_text)
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


def assert_same_adapter(output: Path, reference: Path) -> None:
    got, expected = adapter_tensors(output), adapter_tensors(reference)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        # fp32: equal up to summation order (a resumed run's first step re-reads its state from the checkpoint)
        torch.testing.assert_close(got[name].float(), tensor.float(), atol=1e-5, rtol=0)
