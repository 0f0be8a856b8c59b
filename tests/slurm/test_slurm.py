"""The SLURM templates (slurm/), against a real SLURM and against stand-ins for its commands.

Real SLURM (cluster.py: munged, slurmctld and slurmd started on this machine), this machine's node in CPU mode:
`sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/llama13b_lora.sh` runs two DeepSpeed ranks
on the tiny LLaMA of tiny_models, with the recipe's flags overridden through EXTRA_ARGS the way a user shortens a
run. The chained evaluation gets no EVAL_SBATCH_ARGS: it must take the training job's CPU allocation itself
(eval.sh's own #SBATCH lines ask for GPUs). A preempted job requeues itself and resumes exactly; another is given
one task instead of two while it waits in the queue and resumes on one rank. The two-node runs are
test_two_nodes.py's. Skipped where the SLURM or MUNGE binaries are missing (`apt-get install slurm-wlm munge`) or
the tests do not run as root (slurmd starts jobs as their user).

Stand-ins (`srun`, `scontrol`, `sbatch` scripts that record their calls): what one machine cannot show, a GPU
layout and the exit-code and signal decisions, in a second.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from launch import REPO, losses

from .cluster import (
    ONE_NODE,
    STEPS,
    Job,
    adapter_tensors,
    assert_same_adapter,
    preempt,
    seconds,
    skip_reason,
    submit_lora,
    wait_for_end,
    wait_until,
)

real_slurm = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

# ------------------------------------------------------------------------------------------------------ tests


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


@pytest.mark.slow
@real_slurm
def test_preempted_job_requeues_itself_and_resumes_exactly(cluster, assets, straight):
    """SIGUSR1 twice, the two ways SLURM delivers it: to the job's steps (`scancel --signal=USR1`, as
    `--signal=USR1@120` does before the time limit) and to the batch shell only (`scancel --batch`, as
    `--signal=B:USR1@...`), which relays it to the ranks. Each time every rank finishes its step, checkpoints and
    exits 75, the script requeues the job, and the next run resumes: the same losses and adapter as straight."""
    reference, _ = straight
    job = submit_lora(cluster, assets, "preempted", ONE_NODE, CHAIN_EVAL="0", DS_CONFIG=str(assets / "fp32.json"))
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
    assert_same_adapter(job.output, reference.output)
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
    job up to the interruption, and close to them after. Close, not equal: the recipe's LoRA dropout draws its masks
    per rank, so one rank draws other masks than two did, and each later step's loss moves by the dropout's noise
    (about 0.01 here, single steps up to 0.025). The bounds below are several times that noise and well under what
    a resume from the wrong state gives (the loss falls about 0.04 per step, so restarting from an earlier step's
    adapter shifts every later loss by a multiple of that). That a resume on another number of ranks computes
    exactly what that layout would is tests/training/test_resume_world_size.py's (fp32)."""
    reference, _ = straight
    job = submit_lora(cluster, assets, "reshaped", ONE_NODE, CHAIN_EVAL="0", DS_CONFIG=str(assets / "fp32.json"))
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
    after = [abs(a - b) for a, b in zip(got[stop:], expected[stop:], strict=True)]
    assert max(after) < 0.1 and sum(after) / len(after) < 0.03, (got, expected)
    resumed, straight_adapter = adapter_tensors(job.output), adapter_tensors(reference.output)
    assert set(resumed) == set(straight_adapter)
    timeline.append(
        f"{info['JobState']} {info['ExitCode']} on 1 rank; loss differences to the straight job after step "
        f"{stop}: largest {max(after):.2e}, mean {sum(after) / len(after):.2e} (losses: step 1 "
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
