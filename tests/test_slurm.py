"""The slurm profile against a real SLURM cluster on this machine, not a mock.

`workflow/slurm/local-cluster.sh` installs and starts munged, slurmctld and slurmd on 127.0.0.1;
where that cannot be done (no root, no apt, another cluster's config in /etc/slurm) these tests
skip with its reason. Every job below goes through sbatch and is checked in the scheduler.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, venv_bin
from test_workflow import digests, make_project, set_param

pytestmark = pytest.mark.slow

CLUSTER = REPO / "workflow" / "slurm" / "local-cluster.sh"
SLURM = (
    "snakemake", "--profile", "workflow/profiles/slurm",
    # No slurmdbd on the test cluster, so sacct cannot answer; MinJobAge=3600 keeps finished jobs in squeue.
    "--slurm-status-command", "squeue",
    # The tiny jobs take seconds: poll every few seconds (the plugin's default first wait is 40 s).
    "--slurm-init-seconds-before-status-checks", "2",
)
TIMEOUT = 1200  # seconds for one workflow, then SIGKILL: a hung status loop fails the test, never hangs CI


@pytest.fixture(scope="module")
def cluster():
    """The environment of a live local cluster: SLURM_CONF and the venv on PATH."""
    started = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=900, check=False)
    if started.returncode == 3:
        pytest.skip(started.stderr.strip())
    assert started.returncode == 0, started.stdout + started.stderr
    conf = started.stdout.strip().rpartition("SLURM_CONF=")[2]
    env = {**os.environ, "SLURM_CONF": conf, "PATH": venv_bin()}
    for inherited in ("MLFLOW_TRACKING_URI", "LATENT_INPAINT_INVOCATION", "LATENT_INPAINT_TRACKING"):
        env.pop(inherited, None)  # each project tracks into its own embedded store, its own run
    yield env
    if "already running" not in started.stderr:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120, check=False)


def snakemake(project: Path, env: dict, *args: str, slurm: bool = True) -> tuple[str, float]:
    cmd = [*SLURM, *args] if slurm else ["snakemake", "--cores", "2", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-6000:]}"
    return proc.stdout, time.perf_counter() - start


def submitted(log: str) -> list[str]:
    """SLURM job ids in a snakemake log, in submission order."""
    return re.findall(r"has been submitted with SLURM jobid (\d+)", log)


def scheduler(env: dict, *job_ids: str) -> dict[str, dict]:
    """What SLURM says about these jobs: state, the rule (the plugin's job comment), CPUs."""
    out = subprocess.run(["squeue", "--states=all", "--noheader", "--jobs", ",".join(job_ids), "--format=%i|%T|%k|%C"],
                         env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    rows = (line.split("|") for line in out.splitlines() if line.strip())
    return {i: {"state": s, "rule": re.sub(r"^rule_|_wildcards.*$", "", k), "cpus": int(c)} for i, s, k, c in rows}


def running_job(env: dict, rule: str) -> str:
    def find() -> str | None:
        out = subprocess.run(["squeue", "--noheader", "--states=RUNNING", "--format=%i|%k"], env=env,
                             capture_output=True, text=True, timeout=60, check=True).stdout
        return next((i for i, comment in (line.split("|") for line in out.splitlines())
                     if comment.startswith(f"rule_{rule}")), None)

    return wait_for(find, f"a running {rule} job in the scheduler")


def wait_for(condition, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def checkpoint_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoint" / "config.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


# What both runs must agree on byte for byte: data, tokens, weights, evaluation results, report.
# (Stage metrics files also record throughput, which differs from run to run.)
SAME = ("data/default", "data/shards", "data/masks", "data/tokens", "results/ablations", "results/report.md",
        "results/samples.png", "results/table1.md")
WEIGHTS = ("runs/vqgan/final", "runs/encoder/final", "runs/transformer/final", "runs/decoder/final")


def comparable(project: Path) -> dict[str, str]:
    found = digests(project, *SAME, *WEIGHTS)
    return {f: h for f, h in found.items()
            if not f.endswith(("config.json", "tokens/metrics.json")) and not re.search(r"shards/.*\.json$", f)}


def test_the_pipeline_through_sbatch_equals_the_local_run(cluster, tmp_path):
    local = make_project(tmp_path / "local")
    _, local_s = snakemake(local, cluster, slurm=False)
    project = make_project(tmp_path / "slurm")
    log, slurm_s = snakemake(project, cluster)

    jobs = scheduler(cluster, *submitted(log))
    expected = {"default_data", "prepare", "masks", "vqgan", "tokens", "encoder", "transformer", "decoder",
                "evaluate", "ablation", "report"}
    assert {j["rule"] for j in jobs.values()} == expected, jobs
    assert len(jobs) == 11  # one job a rule: the four ablation variants of the tiny params share one
    assert all(j["state"] == "COMPLETED" for j in jobs.values()), jobs
    print(f"\nlocal snakemake --cores 2: {local_s:.0f} s; through SLURM ({len(jobs)} sbatch jobs): {slurm_s:.0f} s")
    for job_id, job in sorted(jobs.items(), key=lambda kv: int(kv[0])):
        print(f"  SLURM job {job_id}: {job['rule']} {job['state']} ({job['cpus']} CPUs)")

    mine, theirs = comparable(project), comparable(local)
    assert len(mine) > 30 and any(f.endswith("vqgan.safetensors") for f in mine)
    assert mine == theirs, {f for f in mine.keys() | theirs.keys() if mine.get(f) != theirs.get(f)}
    ours = json.loads((project / "results/metrics.json").read_text())["ours"]
    assert ours == json.loads((local / "results/metrics.json").read_text())["ours"]

    again, _ = snakemake(project, cluster)
    assert "Nothing to be done" in again and not submitted(again)


def test_a_training_job_with_two_processes_runs_ddp_inside_its_allocation(cluster, tmp_path):
    project = make_project(tmp_path)
    set_param(project, "resources", "processes", 2)  # torchrun --nproc_per_node 2, gloo on CPU
    log, _ = snakemake(project, cluster, "runs/vqgan/final/config.json")
    jobs = scheduler(cluster, *submitted(log))
    (vqgan,) = [j for j in jobs.values() if j["rule"] == "vqgan"]
    assert vqgan["state"] == "COMPLETED" and vqgan["cpus"] == 2  # processes x (train.workers + 1)
    final = json.loads((project / "runs/vqgan/final/config.json").read_text())
    assert final["world_size"] == 2 and len(final["rank_digests"]) == 2
    assert final["rank_digests"][0] == final["rank_digests"][1]

    # On a GPU cluster (resources.gpu) the same job asks for one GPU per process. This cluster has
    # none, so SLURM itself refuses the request: proof that sbatch got it.
    cmd = [*SLURM, "--config", "resources={gpu: true}", "--forcerun", "vqgan", "--retries", "0", "--verbose",
           "runs/vqgan/final/config.json"]
    refused = subprocess.run(cmd, cwd=project, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, timeout=TIMEOUT, check=False)
    assert refused.returncode != 0
    (call,) = {line.strip() for line in refused.stdout.splitlines() if line.startswith("sbatch call:")}
    assert "--gpus=2" in call and "--cpus-per-task=2" in call and "--comment rule_vqgan" in call, call
    assert "Invalid generic resource (gres) specification" in refused.stdout


def test_a_preempted_training_job_resumes_from_its_checkpoint(cluster, tmp_path):
    project = make_project(tmp_path)
    set_param(project, "vqgan", "steps", 240)
    set_param(project, "train", "checkpoint_every", 20)
    run_dir = project / "runs/vqgan"
    output = tmp_path / "snakemake.log"  # a file, not a pipe nobody reads while the test waits
    with output.open("w") as out:
        workflow = subprocess.Popen([*SLURM, "runs/vqgan/final/config.json"], cwd=project, env=cluster, stdout=out,
                                    stderr=subprocess.STDOUT)
    try:
        # 1. SLURM preempts the job and requeues it (PreemptMode=REQUEUE does exactly this).
        wait_for(lambda: checkpoint_step(run_dir) >= 20, "the first checkpoint")
        first = running_job(cluster, "vqgan")
        subprocess.run(["scontrol", "requeue", first], env=cluster, check=True, timeout=60)
        wait_for(lambda: scheduler(cluster, first)[first]["state"] == "PENDING", "the requeued job to pend")
        requeued_at = checkpoint_step(run_dir)  # written on SIGTERM, before the job left the node
        # A requeued job is held for 120 s (BeginTime); release it now rather than wait.
        subprocess.run(["scontrol", "update", f"JobId={first}", "StartTime=now"], env=cluster, check=True, timeout=60)

        # 2. The same job, running again, is cancelled; Snakemake resubmits it (retries: 1 in the profile).
        wait_for(lambda: checkpoint_step(run_dir) > requeued_at, "a checkpoint after the requeue")
        assert running_job(cluster, "vqgan") == first
        subprocess.run(["scancel", first], env=cluster, check=True, timeout=60)
        workflow.wait(timeout=TIMEOUT)
    finally:
        if workflow.poll() is None:
            workflow.kill()
    log = output.read_text()
    assert workflow.returncode == 0, log[-6000:]

    ids = submitted(log)
    jobs = scheduler(cluster, *ids)
    vqgan_jobs = [i for i in ids if jobs[i]["rule"] == "vqgan"]
    assert vqgan_jobs[0] == first and len(vqgan_jobs) == 2, jobs  # requeued under its id, then resubmitted
    assert jobs[first]["state"] == "CANCELLED" and jobs[vqgan_jobs[1]]["state"] == "COMPLETED", jobs
    final = json.loads((run_dir / "final/config.json").read_text())
    assert final["step"] == 240
    after_requeue, after_cancel = final["resumed_from"]
    assert after_requeue == requeued_at >= 20 and after_cancel > after_requeue, final["resumed_from"]
    print(f"\nSLURM job {first} requeued at step {requeued_at}, resumed from {after_requeue}; cancelled and "
          f"resubmitted as job {vqgan_jobs[1]}, resumed from {after_cancel}; finished at step {final['step']}")

    kept = digests(project, "runs/vqgan/final")
    again, _ = snakemake(project, cluster, "runs/vqgan/final/config.json")
    assert "Nothing to be done" in again and not submitted(again)
    assert digests(project, "runs/vqgan/final") == kept
