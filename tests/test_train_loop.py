"""The shared training loop, driven by the tiny two-phase stage in loop_stage.py (a fixture)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from loop_stage import IN, NO_TRACKING, OUT, TinyStage, train_config

from latent_inpaint.config import TrackingConfig
from latent_inpaint.saved import load_weights
from latent_inpaint.train import CheckpointMismatch, scaled_lr, train
from latent_inpaint.precision import cpu_computes_bf16, precision_for, resolve_precision

SCRIPT = Path(__file__).with_name("loop_stage.py")
PYTHON = Path(sys.executable)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add noise and contention
    yield
    torch.set_num_threads(threads)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def script(run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [str(PYTHON), str(SCRIPT), "--run-dir", str(run_dir), "--steps", str(steps), *extra]


def script_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """The script in the background, its stderr (progress bar, messages) into `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, env=script_env(), stderr=f)


def wait_for(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the script ended (rc {proc.returncode}) before {what}: {log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_loss_falls_outputs_written_tracked_and_rerun_is_a_no_op(tmp_path):
    stage = TinyStage()
    before = stage.evaluate(stage.modules)["val_mse"]
    tracking = TrackingConfig(enabled=True, uri=f"sqlite:///{tmp_path}/m.db", experiment="test", log_images=True,
                              log_models=False)
    cfg = train_config(log_every=10, checkpoint_every=50, image_every=50)
    metrics = train(stage, cfg, 100, tmp_path / "run", tracking, {"tiny": {"hidden": 32}}, device="cpu")

    assert metrics["eval"]["val_mse"] < before / 4
    assert metrics["step"] == 100 and metrics["world_size"] == 1
    assert metrics["train"]["images_per_s"] > 0
    assert read_json(tmp_path / "run" / "metrics.json") == metrics
    final = read_json(tmp_path / "run" / "final" / "config.json")
    assert final["step"] == 100 and final["config"] == stage.config() and final["resumed_from"] == []
    assert final["models"] == {name: m.spec() for name, m in stage.modules.items()}  # what rebuilds them
    assert read_json(tmp_path / "run" / "checkpoint" / "config.json")["step"] == 100
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if not p.name.startswith(".")) == [
        "checkpoint", "curves.json", "final", "history.jsonl", "metrics.json",
    ]  # fmt: skip

    fresh = TinyStage(seed=1)
    assert fresh.evaluate(fresh.modules)["val_mse"] != metrics["eval"]["val_mse"]
    info = load_weights(tmp_path / "run", {"gen": fresh.modules["gen"]})
    assert info["step"] == 100
    assert fresh.evaluate(fresh.modules)["val_mse"] == pytest.approx(metrics["eval"]["val_mse"], rel=1e-6)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    parent, run = sorted(runs, key=lambda r: "mlflow.parentRunId" in r.data.tags)  # the stage's child run
    assert run.info.run_name == "tiny" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params == {"tiny.hidden": "32"}
    assert run.data.tags["latent_inpaint.weights"] == str((tmp_path / "run" / "final").resolve())
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/gen")] == list(range(10, 101, 10))
    assert client.get_metric_history(run.info.run_id, "eval/val_mse")[-1].value == metrics["eval"]["val_mse"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "pictures")} == {
        "pictures/step0000050.png", "pictures/step0000100.png",
    }  # fmt: skip

    class NoTraining(TinyStage):
        def batches(self, rank, world_size, seed):
            raise AssertionError("a finished run must not train again")

    again = train(NoTraining(), cfg, 100, tmp_path / "run", NO_TRACKING, {}, device="cpu")
    assert again == metrics


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    accumulated, whole = TinyStage(batch_size=4, critic_start=1), TinyStage(batch_size=8, critic_start=1)
    train(accumulated, train_config(grad_accum=2), 6, tmp_path / "a", NO_TRACKING, {}, device="cpu")
    train(whole, train_config(grad_accum=1), 6, tmp_path / "b", NO_TRACKING, {}, device="cpu")
    moved = False
    for name in ("gen", "critic"):
        for (pname, a), b, start in zip(
            accumulated.modules[name].named_parameters(),
            whole.modules[name].parameters(),
            TinyStage().modules[name].parameters(),
        ):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=f"{name}.{pname}")
            moved |= not torch.allclose(a, start)
    assert moved
    assert accumulated.leaks == [] and whole.leaks == []  # the generator's backward left the critic alone


def test_bf16_autocast_on_cpu_and_fp32(tmp_path):
    bf16, fp32 = TinyStage(), TinyStage()
    train(bf16, train_config(precision="bf16"), 2, tmp_path / "a", NO_TRACKING, {}, device="cpu")
    train(fp32, train_config(precision="fp32"), 2, tmp_path / "b", NO_TRACKING, {}, device="cpu")
    assert bf16.dtypes == {torch.bfloat16} and fp32.dtypes == {torch.float32}
    assert bf16.modules["gen"][0].weight.dtype == torch.float32  # autocast leaves the weights in fp32
    # What ran is recorded with the weights (for auto: what it resolved to on this machine).
    assert read_json(tmp_path / "a" / "final" / "config.json")["precision"] == "bf16"
    assert read_json(tmp_path / "b" / "final" / "config.json")["precision"] == "fp32"
    train(TinyStage(), train_config(precision="auto"), 2, tmp_path / "c", NO_TRACKING, {}, device="cpu")
    ran = read_json(tmp_path / "c" / "final" / "config.json")["precision"]
    assert ran == ("bf16" if cpu_computes_bf16() else "fp32")


class WithExtras(TinyStage):
    """The optional hooks: a frozen helper, an lr schedule, and counts for throughput."""

    def __init__(self):
        super().__init__()
        self.frozen = {"teacher": torch.nn.Linear(OUT, OUT)}

    def optimizers(self, modules, world_size):
        self.built = super().optimizers(modules, world_size)
        return self.built

    def lr_factor(self, phase, step):
        return 0.5 if phase == "gen" else 1.0

    def counts(self, batch):
        return {"images": len(batch["x"]), "values": batch["x"].numel()}

    def loss(self, phase, modules, batch, step, scratch):
        teacher = modules["teacher"]
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        return super().loss(phase, modules, batch, step, scratch)


def test_optional_hooks_frozen_modules_lr_schedule_and_counts(tmp_path):
    stage = WithExtras()
    teacher = stage.frozen["teacher"].weight.clone()
    metrics = train(stage, train_config(), 4, tmp_path / "run", NO_TRACKING, {}, device="cpu")
    assert torch.equal(stage.frozen["teacher"].weight, teacher)
    assert stage.built["gen"].param_groups[0]["lr"] == pytest.approx(0.5 * stage.lr)
    assert stage.built["critic"].param_groups[0]["lr"] == pytest.approx(5 * stage.lr)
    assert metrics["train"]["values_per_s"] == pytest.approx(IN * metrics["train"]["images_per_s"])
    assert sorted(p.name for p in (tmp_path / "run" / "final").iterdir()) == [
        "config.json", "critic.safetensors", "gen.safetensors",
    ]  # fmt: skip


def test_one_process_per_run_folder(tmp_path):
    from filelock import FileLock

    (tmp_path / "run").mkdir()
    with FileLock(tmp_path / "run" / ".train.lock"):
        with pytest.raises(RuntimeError, match="another process is training in"):
            train(TinyStage(), train_config(), 2, tmp_path / "run", NO_TRACKING, {}, device="cpu")


def test_kill_and_resume(tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "stderr"
    proc = start(script(run, 40, "--checkpoint-every", "3", "--step-delay", "0.05"), log)
    wait_for(lambda: (run / "checkpoint" / "config.json").exists(), proc, log, "the first checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()
    # A kill in mid-swap leaves the previous checkpoint as checkpoint.old; the rerun restores it.
    kept = run / "checkpoint" if (run / "checkpoint" / "config.json").exists() else run / "checkpoint.old"
    killed_at = read_json(kept / "config.json")["step"]
    assert 0 < killed_at < 40 and killed_at % 3 == 0
    junk = run / "checkpoint.tmp-123"  # what a kill while writing a checkpoint leaves behind
    junk.mkdir()
    (junk / "gen.safetensors").write_bytes(b"half a file")

    done = subprocess.run(script(run, 40), env=script_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    final = read_json(run / "final" / "config.json")
    assert final["step"] == 40 and final["resumed_from"] == [killed_at]
    assert read_json(run / "metrics.json")["step"] == 40
    assert not junk.exists()
    # history.jsonl repeats the steps logged after the checkpoint the rerun resumed from;
    # curves.json (what `dvc plots` reads) holds each logged step once, the resumed run's record.
    logged = [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()]
    curves = read_json(run / "curves.json")
    assert [r["step"] for r in curves] == list(range(2, 41, 2)) and len(logged) >= len(curves)
    assert curves[-1] == json.loads((run / "history.jsonl").read_text().splitlines()[-1])


def test_interrupted_swap_restores_the_previous_checkpoint_and_more_steps_extend_a_run(tmp_path):
    run = tmp_path / "run"
    train(TinyStage(), train_config(checkpoint_every=4), 4, run, NO_TRACKING, {}, device="cpu")
    # Killed between the two renames of a swap: the old checkpoint is aside, the new one complete.
    os.rename(run / "checkpoint", run / "checkpoint.old")
    shutil.copytree(run / "checkpoint.old", run / "checkpoint.tmp-999")
    metrics = train(TinyStage(), train_config(checkpoint_every=4), 6, run, NO_TRACKING, {}, device="cpu")
    assert metrics["step"] == 6
    assert read_json(run / "final" / "config.json")["resumed_from"] == [4]
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "checkpoint", "curves.json", "final", "history.jsonl", "metrics.json",
    ]  # fmt: skip


def test_torchrun_ddp_keeps_two_ranks_identical(tmp_path):
    run = tmp_path / "run"
    torchrun = PYTHON.with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", *script(run, 6)[1:]]
    done = subprocess.run(cmd, env=script_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    final = read_json(run / "final" / "config.json")
    assert final["world_size"] == 2 and final["metrics"]["world_size"] == 2
    assert len(final["rank_digests"]) == 2 and final["rank_digests"][0] == final["rank_digests"][1]
    # The ranks read different batches: equal weights mean DDP averaged the gradients.
    single = TinyStage()
    train(single, train_config(), 6, tmp_path / "single", NO_TRACKING, {}, device="cpu")
    assert read_json(tmp_path / "single" / "final" / "config.json")["rank_digests"][0] != final["rank_digests"][0]


def test_resuming_another_configuration_is_an_error_naming_the_keys(tmp_path):
    run = tmp_path / "run"
    train(TinyStage(hidden=16), train_config(), 2, run, NO_TRACKING, {}, device="cpu")
    with pytest.raises(CheckpointMismatch, match=r"hidden: saved 16, now 8") as err:
        train(TinyStage(hidden=8), train_config(), 4, run, NO_TRACKING, {}, device="cpu")
    assert str(run) in str(err.value) and "final" in str(err.value)
    shutil.rmtree(run / "final")
    with pytest.raises(CheckpointMismatch, match=r"checkpoint was trained with another tiny configuration"):
        train(TinyStage(hidden=8), train_config(), 4, run, NO_TRACKING, {}, device="cpu")
    with pytest.raises(CheckpointMismatch, match=r"holds no weights for module 'disc'"):
        load_weights(run / "checkpoint", {"disc": torch.nn.Linear(6, 1)})
    with pytest.raises(CheckpointMismatch, match=r"gen.safetensors does not fit module 'gen'"):
        load_weights(run / "checkpoint", {"gen": TinyStage(hidden=8).modules["gen"]})


def test_sigterm_checkpoints_the_current_step_and_the_rerun_finishes(tmp_path):
    run, progress = tmp_path / "run", tmp_path / "progress"
    log = tmp_path / "stderr"
    proc = start(script(run, 200, "--step-delay", "0.05", "--progress", str(progress)), log)
    wait_for(lambda: progress.exists() and progress.read_text() not in ("", "0", "1", "2"), proc, log, "step 3")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, log.read_text()
    assert "SIGTERM: stopped tiny training at step" in log.read_text()
    assert "Rerun the same command to resume" in log.read_text()
    stopped_at = read_json(run / "checkpoint" / "config.json")["step"]
    assert 3 <= stopped_at < 200  # checkpoint_every is 1000: this one came from the signal
    assert int(progress.read_text()) + 1 == stopped_at  # the step under way when the signal came

    done = subprocess.run(script(run, 200), env=script_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    final = read_json(run / "final" / "config.json")
    assert final["step"] == 200 and final["resumed_from"] == [stopped_at]


def test_scaled_lr_follows_taming():
    assert scaled_lr(4.5e-6, 12, 8) == pytest.approx(4.32e-4)
    assert scaled_lr(4.5e-6, 8, 2, grad_accum=4) == pytest.approx(4.5e-6 * 64)


def test_a_ddp_wrapper_reads_its_modules_attributes_through():
    import torch.distributed as dist

    from latent_inpaint.train.distributed import DDP

    dist.init_process_group("gloo", init_method=f"file://{Path(tempfile.mkdtemp()) / 'rendezvous'}", rank=0,
                            world_size=1)
    try:
        gen = TinyStage().modules["gen"]
        wrapped = DDP(gen)
        assert wrapped.spec() == gen.spec() and wrapped.module is gen  # a method and DDP's own attribute
        x = torch.randn(3, IN)
        assert torch.equal(wrapped(x), gen(x))
        with pytest.raises(AttributeError, match="no_such_thing"):
            wrapped.no_such_thing
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device_type, capability, cpu_bf16, expected", [
    ("cpu", None, False, "fp32"),
    ("cpu", None, True, "bf16"),  # AVX512-BF16 or AMX: oneDNN's bf16 kernels beat fp32
    ("mps", None, True, "fp32"),
    ("cuda", (7, 0), False, "fp16"),  # V100, the paper's GPU: no bf16 tensor cores
    ("cuda", (7, 5), False, "fp16"),  # T4
    ("cuda", (8, 0), False, "bf16"),  # A100
    ("cuda", (9, 0), False, "bf16"),  # H100
])
def test_auto_precision_follows_the_device_capability(device_type, capability, cpu_bf16, expected):
    assert resolve_precision("auto", device_type, capability, cpu_bf16=cpu_bf16) == expected
    # Inference on a CPU stays fp32 (a batched sample is bit for bit the one drawn alone); on a GPU
    # it follows training.
    inference = "fp32" if device_type != "cuda" else expected
    assert resolve_precision("auto", device_type, capability, inference=True, cpu_bf16=cpu_bf16) == inference
    for explicit in ("bf16", "fp16", "fp32"):
        assert resolve_precision(explicit, device_type, capability, cpu_bf16=cpu_bf16) == explicit
        assert resolve_precision(explicit, device_type, capability, inference=True) == explicit


def test_cpu_training_precision_follows_this_cpu_and_inference_is_fp32():
    autocast, scaler = precision_for("auto", torch.device("cpu"))
    expected = torch.bfloat16 if cpu_computes_bf16() else torch.float32
    assert not scaler.is_enabled()
    with autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == expected
    autocast, scaler = precision_for("auto", torch.device("cpu"), inference=True)
    with autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    loss = torch.ones((), requires_grad=True) * 3
    assert scaler.scale(loss) is loss


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's CPU flags")
def test_cpu_bf16_is_what_the_cpu_flags_say():
    flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
             for f in line.split(":", 1)[1].split()}
    assert cpu_computes_bf16() == bool(flags & {"avx512_bf16", "amx_tile"})
