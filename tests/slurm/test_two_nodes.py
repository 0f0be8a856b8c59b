"""`sbatch --nodes=2 --ntasks-per-node=1 slurm/llama13b_lora.sh` on a real two-node SLURM (cluster.py's partition
`pair`: nodes n1 and n2, each slurmd in its own UTS namespace with its own address), one rank per node in CPU mode,
fp32, against the one-node two-rank job of conftest.py: the same losses and adapter after a preemption and requeue,
the chained evaluation on the two-node allocation, and a rank on n2 killed: the job leaves the queue within the
collective timeout instead of hanging, and the same submission resumes from the newest checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from launch import losses

from .cluster import (
    EXTRA_ARGS,
    STEPS,
    TWO_NODES,
    Cluster,
    Job,
    assert_same_adapter,
    complete_steps,
    log_lines,
    preempt,
    seconds,
    skip_reason,
    submit_lora,
    wait_for_end,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]
DIST_TIMEOUT = 60  # --dist_timeout of the killed job: seconds a collective waits for a rank that is gone
KILLED_RUN = 12  # steps of the killed job


def rank_processes(job: Job) -> dict[int, int]:
    """RANK → PID of the job's training processes (the ranks srun started, not processes they started)."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
            command = (entry / "cmdline").read_text()
        except OSError:  # gone meanwhile
            continue
        if environ.get("SLURM_JOB_ID") == str(job.id) and "launcher/train.py" in command and "SLURM_STEP_ID" in environ:
            rank = int(environ["SLURM_PROCID"])
            found[rank] = min(found.get(rank, int(entry.name)), int(entry.name))
    return found


def host_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/uts")


def node_namespaces(cluster: Cluster) -> dict[str, str]:
    return {name: host_namespace(pid) for name, pid in cluster.pair_daemons.items()}


def test_two_nodes_train_as_one_resume_after_preemption_and_chain_the_evaluation(cluster, assets, straight):
    """One rank per node, preempted once (`scancel --signal=USR1`): both ranks checkpoint, the job requeues itself
    and resumes on both nodes; its losses and adapter are the one-node two-rank job's (fp32), and its chained
    evaluation runs on the two nodes and scores the same as the one-node job's."""
    reference, _ = straight
    job = submit_lora(cluster, assets, "two-nodes", TWO_NODES, DS_CONFIG=str(assets / "fp32.json"))
    timeline = [f"job {job.id} submitted on 2 nodes"]
    stop = preempt(cluster, job, 0, ["--signal=USR1"], timeline)
    assert 0 < stop < STEPS
    info = wait_for_end(cluster, job)
    assert (info["ExitCode"], info["Restarts"], info["NodeList"], info["BatchHost"]) == ("0:0", "1", "n[1-2]", "n1")
    text = job.log_text()
    assert text.count("on n[1-2]: 2 node(s) × 1 rank(s) = 2") == 2 and text.count("requeueing job") == 1
    assert "MASTER_ADDR=n1," in (job.output / "slurm" / f"job-{job.id}" / "command.sh").read_text()
    assert f"resumed from {job.output / 'checkpoints' / f'step-{stop}'} at step {stop} on 2 rank(s)" in text
    shards = sorted(path.name for path in (job.output / "checkpoints" / f"step-{stop}").rglob("*rank_*"))
    assert any("rank_0" in name for name in shards) and any("rank_1" in name for name in shards), shards
    assert losses(job.output) == pytest.approx(losses(reference.output), abs=1e-6)
    assert_same_adapter(job.output, reference.output)

    eval_id = int((job.output / "slurm" / f"job-{job.id}" / "eval_job").read_text())
    eval_job = Job(eval_id, job.output / "eval", job.output / "eval" / f"llama13b-lora-eval-{eval_id}.out")
    eval_info = wait_for_end(cluster, eval_job)
    assert (eval_info["NumNodes"], eval_info["NumTasks"], eval_info["NodeList"]) == ("2", "2", "n[1-2]")
    assert "on n[1-2]: 2 node(s) × 1 rank(s) = 2" in eval_job.log_text()
    scores = []  # the summaries without their run's paths and timings
    for run in (job.output, reference.output):
        summary = json.loads((run / "eval" / "summary.json").read_text())
        scores.append({key: value for key, value in summary.items() if key not in ("settings", "timing")})
    assert scores[0] == scores[1] and "Toy" in json.dumps(scores[0])
    timeline.append(f"finished after 1 restart, last run {seconds(info)} s; evaluation {seconds(eval_info)} s")
    print("\n" + "; ".join(timeline))


def test_a_rank_killed_on_the_second_node_ends_the_job_and_the_same_submission_resumes(cluster, assets, straight):
    """SIGKILL to the rank on n2 (a crash: no checkpoint, no exit code of its own): the rank on n1 fails its
    collective, the job leaves the queue within --dist_timeout, and submitting the same job again resumes from the
    newest complete checkpoint on both nodes and finishes with the one-node job's losses (its first KILLED_RUN steps:
    the scheduler is constant, so a shorter run is a prefix of a longer one)."""
    reference, _ = straight
    settings = {
        "CHAIN_EVAL": "0",
        "DS_CONFIG": str(assets / "fp32.json"),
        "EXTRA_ARGS": f"{EXTRA_ARGS} --max_steps {KILLED_RUN} --save_steps 4 --dist_timeout {DIST_TIMEOUT}",
    }
    job = submit_lora(cluster, assets, "killed", TWO_NODES, **settings)
    wait_until(lambda: 4 in complete_steps(job.output) and log_lines(job.output) > 4, "a checkpoint at step 4",
               context=job.log_text)  # fmt: skip
    ranks = rank_processes(job)
    assert sorted(ranks) == [0, 1], ranks
    namespaces = node_namespaces(cluster)
    assert [host_namespace(ranks[0]), host_namespace(ranks[1])] == [namespaces["n1"], namespaces["n2"]]
    killed_at = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    info = wait_for_end(cluster, job, state="FAILED")
    took = time.monotonic() - killed_at
    assert took < DIST_TIMEOUT, f"the job took {took:.0f} s to leave the queue after the kill"
    assert "the ranks failed" in job.log_text()
    newest = complete_steps(job.output)[-1]

    again = submit_lora(cluster, assets, "killed", TWO_NODES, **settings)
    again_info = wait_for_end(cluster, again)
    assert again_info["NodeList"] == "n[1-2]" and again_info["ExitCode"] == "0:0"
    resumed = f"resumed from {job.output / 'checkpoints' / f'step-{newest}'} at step {newest} on 2 rank(s)"
    assert resumed in again.log_text()
    assert losses(again.output) == pytest.approx(losses(reference.output)[:KILLED_RUN], abs=1e-6)
    print(
        f"\njob {job.id}: rank 1 killed on n2 → {info['JobState']} {info['ExitCode']} {took:.0f} s later; job "
        f"{again.id} resumed at step {newest} and finished in {seconds(again_info)} s"
    )
