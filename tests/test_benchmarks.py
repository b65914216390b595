"""benchmarks/paper_inference.py at reduced width on the CPU, so the script does not rot: it
builds the parts, times both paths stage by stage, and finds the batched samples equal to the
ones of the code before batching."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_inference_benchmark_runs_at_reduced_width(tmp_path, capsys):
    bench = load_benchmark("paper_inference")
    out = tmp_path / "inference.json"
    # 3 samples, 2 rows a batch: the new path crosses a batch boundary, the old one does not.
    bench.main(["--device", "cpu", "--width", "reduced", "--samples", "3", "--set", "sample.batch_size=2",
                "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["machine"]["device"] and result["width"] == "reduced" and result["size"] == 32
    assert set(result["old"]["batch1_seconds"]["wall"]) == {"encoder", "sampling", "decoder"}
    assert set(result["new"]["samples3_seconds"]["cpu"]) == {"encoder+prior", "sampling", "decoder"}
    assert result["same_tokens"] and result["pixel_max_abs_diff_float"] <= bench.PIXEL_NOISE
    assert result["new"]["sample0_alone_vs_in_batch_max_abs_diff"] == 0.0  # batch-independent samples
    assert result["memory_mb"]["peak_after_new"] >= result["memory_mb"]["after_build"] > 0
    assert result["speedup_3_samples"]["wall"] > 0 and result["speedup_3_samples"]["cpu"] > 0
    capsys.readouterr()
