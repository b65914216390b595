"""The workflow on the authors' released models (`--config pretrained='{official: DIR, model: M}'`):
import_official in place of every training rule, then masks, evaluation and report on the
imported models; the ablation that needs a model trained here is skipped, with the reason."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import pytest
import yaml
from conftest import REPO, params
from loop_stage import Mlp
from test_official_equivalence import TINY, released_folder
from test_workflow import make_project, sh

from latent_inpaint.config import ConfigError, validate
from latent_inpaint.saved import export_final, write_model
from latent_inpaint.stages import official
from latent_inpaint.stages.report import weights_used

sys.path.insert(0, str(REPO / "workflow"))
import dag  # noqa: E402

TRAINING = {"vqgan", "tokens", "encoder", "encoder_vanilla", "transformer", "decoder"}
ABLATIONS = ["full", "alpha0.25", "miracle_encoder", "vanilla_encoder", "vanilla_decoder"]


def pretrained(folder, model="places256", architecture=None) -> dict:
    return {"official": str(folder), "model": model, "architecture": architecture}


def tiny_sizes() -> dict:
    """The reduced width of the committed fixtures as an architecture file holds it."""
    return json.loads(json.dumps(dataclasses.asdict(TINY)))


def test_params_name_a_missing_folder_or_an_unknown_model(tmp_path):
    config = params()
    with pytest.raises(ConfigError, match=f"pretrained.official: no folder {tmp_path / 'nope'}"):
        validate({**config, "pretrained": pretrained(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="pretrained.model must be one of places256, places512, celeba; got 'x'"):
        validate({**config, "pretrained": pretrained(tmp_path, "x")})
    with pytest.raises(ConfigError, match="pretrained.official: no folder None"):
        validate({**config, "pretrained": {"official": None, "model": "celeba", "architecture": None}})
    assert validate({**config, "pretrained": pretrained(tmp_path)})["pretrained"]["model"] == "places256"


def test_an_architecture_file_gives_other_sizes_and_names_a_wrong_key(tmp_path):
    sizes = tiny_sizes()
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(sizes))
    assert official.Architecture.load(tmp_path / "tiny.yaml") == TINY
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**sizes, "vqgan": {**sizes["vqgan"], "n_embeds": 8}}))
    with pytest.raises(ConfigError, match="bad.yaml: vqgan has exactly the keys base_channels, channel_mult"):
        official.Architecture.load(tmp_path / "bad.yaml")


def test_the_import_replaces_every_training_rule_in_snakemake_and_dvc(tmp_path):
    config = {**params(), "pretrained": pretrained(tmp_path)}
    config["evaluate"] = {**config["evaluate"], "ablations": ABLATIONS}
    rules = dag.pipeline(config)
    assert "import_official" in rules and not TRAINING & set(rules)
    assert rules["evaluate"].needs == ("prepare", "masks", "import_official")
    assert set(dag.skipped_ablations(config)) == {"vanilla_encoder"}
    assert "runs/refiner/final/refiner.safetensors" in dag.targets(config)
    assert "results/curves.png" not in dag.targets(config)  # nothing trained: no training curves
    stages = yaml.safe_load(dag.dvc_yaml(config))["stages"]
    assert not TRAINING & set(stages) and "results/ablations/vanilla_encoder.json" not in stages["ablation"]["cmd"]
    assert rules["ablation"].needs == ("prepare", "masks", "import_official")  # no encoder_vanilla to wait for
    assert {"runs/vqgan", "runs/refiner"} <= set(stages["evaluate"]["deps"])
    assert "src/latent_inpaint/stages/official.py" in stages["import_official"]["deps"]
    assert stages["import_official"]["params"] == ["pretrained", "vqgan", "encoder", "transformer"]
    assert dag.pipeline(params()).keys() == dag.STAGES.keys() - {"import_official"}  # the default: train


def test_snakemake_plans_the_import_and_no_training(tmp_path):
    """The import reads the model's released files (a replaced one reimports; a missing one is named)."""
    checkpoints = released_folder(tmp_path / "ckpts")
    plan = sh(REPO, "snakemake", "--cores", "2", "--dry-run", "--forceall", "--config",
              f"pretrained={{official: {checkpoints}, model: places256}}").stdout
    planned = set(re.findall(r"^rule (\w+):", plan, re.M))
    assert "import_official" in planned and {"evaluate", "report"} <= planned and not TRAINING & planned
    assert str(checkpoints / "places256_unet.ckpt") in plan
    (checkpoints / "places256_unet.ckpt").unlink()
    missing = sh(REPO, "snakemake", "--cores", "2", "--dry-run", "--config",
                 f"pretrained={{official: {checkpoints}, model: places256}}", ok=False)
    assert missing.returncode != 0 and "places256_unet.ckpt" in missing.stdout
    bad = sh(REPO, "snakemake", "--cores", "2", "--dry-run", "--config",
             f"pretrained={{official: {tmp_path / 'nope'}, model: places256}}", ok=False)
    assert bad.returncode == 2 and f"no folder {tmp_path / 'nope'}" in bad.stdout


@pytest.mark.slow
def test_the_workflow_evaluates_the_released_models_and_trains_nothing(tmp_path):
    """The committed reduced-width release (tests/fixtures/official), imported by the workflow's
    import_official rule, scored and reported at 32 px; the report names the weights."""
    project = make_project(tmp_path / "project")
    checkpoints = released_folder(tmp_path / "ckpts")
    sizes = tmp_path / "tiny.yaml"
    sizes.write_text(yaml.safe_dump(tiny_sizes()))
    config = yaml.safe_load((project / "params.yaml").read_text())
    config["pretrained"] = pretrained(checkpoints, architecture=str(sizes))
    config["evaluate"]["ablations"] = ABLATIONS
    (project / "params.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (project / "dvc.yaml").write_text(dag.dvc_yaml(config, project))
    run = sh(project, "snakemake", "--cores", "2").stdout
    ran = set(re.findall(r"^(?:local)?rule (\w+):", run, re.M))
    assert "import_official" in ran and not TRAINING & ran, ran
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    assert metrics["ours"]["box"]["fid"] >= 0
    assert sorted(p.stem for p in (project / "results" / "ablations").glob("*.json")) == sorted(
        set(ABLATIONS) - {"vanilla_encoder"})
    report = (project / "results" / "report.md").read_text()
    assert "Ablation vanilla_encoder not scored: needs the encoder_vanilla rule's model" in report
    for stage, name in (("transformer", "places256_transformer.ckpt"), ("refiner", "places256_unet.ckpt")):
        size = (checkpoints / name).stat().st_size
        assert re.search(rf"\| {stage} \| imported: the authors' places256 model, {re.escape(str(checkpoints / name))} "
                         rf"\({size:,} bytes\) \| {stage}\.safetensors [\d,]+ bytes, sha256 [0-9a-f]{{16}} \|", report)
    assert "Nothing to be done" in sh(project, "snakemake", "--cores", "2", "--dry-run").stdout


def test_the_report_says_which_weights_it_used(tmp_path):
    """Trained here (steps, the code's commit) or imported (the released file and its size), and
    every weight file's size and sha256; a model folder that is not there is not listed."""
    (tmp_path / "vqgan" / "final").mkdir(parents=True)
    write_model(tmp_path / "vqgan" / "final", {"stage": "vqgan", "step": 7}, {"vqgan": Mlp(2, 3, 2)})
    source = tmp_path / "celeba_decoder.ckpt"
    source.write_bytes(b"x" * 1234)
    export_final(tmp_path / "refiner", "refiner", {"refiner": Mlp(2, 3, 2)}, str(source), official_model="celeba",
                 source_bytes=1234)
    table = weights_used(tmp_path, ["vqgan", "encoder", "refiner"])
    assert re.search(r"^\| vqgan \| trained here: 7 steps, code at commit \S+.* \| vqgan\.safetensors [\d,]+ bytes, "
                     r"sha256 [0-9a-f]{16} \|$", table, re.M), table
    assert f"| refiner | imported: the authors' celeba model, {source} (1,234 bytes) | refiner.safetensors " in table
    assert "| encoder |" not in table
