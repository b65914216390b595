"""params.yaml is the one source of hyperparameters; every bad key is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, params
from latent_inpaint.config import SECTIONS, ConfigError, build, section, validate
from latent_inpaint.params import PACKAGED_PARAMS, default_params_file, load_params


def test_defaults_and_paper_overlay_build_every_section():
    validate(params())
    paper = load_params([REPO / "params.yaml", REPO / "workflow/configs/paper.yaml"])
    validate(paper)
    assert section(paper, "data").size == 256
    vq = section(paper, "vqgan")
    assert (vq.n_embed, vq.embed_dim, vq.channel_mult) == (1024, 256, (1, 1, 2, 2, 4))
    tf = section(paper, "transformer")
    assert (tf.n_layer, tf.n_embd, tf.n_head) == (40, 1408, 16)
    assert section(paper, "tracking") == section(params(), "tracking")  # untouched sections stay
    res = section(paper, "resources")
    assert res.gpu and res.processes == 3 and res.train.runtime == 2880  # the paper's 3 V100s
    assert not section(params(), "resources").gpu  # the tiny default runs on CPUs


def test_paper_overlay_learning_rates_follow_the_authors_rule():
    """lr = GPUs x batch x 4.5e-6 for every stage (the authors' train.py and configs)."""
    paper = load_params([REPO / "params.yaml", REPO / "workflow/configs/paper.yaml"])
    gpus, base = section(paper, "resources").processes, section(paper, "vqgan").base_lr
    assert base == 4.5e-6
    for name in ("encoder", "transformer", "decoder"):
        cfg = section(paper, name)
        assert cfg.lr == pytest.approx(gpus * cfg.batch_size * base, rel=1e-12), name
    assert [section(paper, n).lr for n in ("encoder", "transformer", "decoder")] == pytest.approx(
        [2.16e-4, 1.62e-4, 8.1e-5])


def test_paper_overlay_scores_ablations_on_the_table_2_subset():
    paper = load_params([REPO / "params.yaml", REPO / "workflow/configs/paper.yaml"])
    assert section(paper, "evaluate").ablation_images == 3000


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.sise=64", "unknown key 'sise' in --set.data"),
        ("data.size=big", "data.size must be int, got 'big'"),
        ("data.size=0", "data.size must be positive"),
        ("data.layout=lmdb", "data.layout must be one of folder, places365, celebahq"),
        ("masks.small.hole_range=[0.6, 0.2]", "hole_range must satisfy"),
        ("transformer.betas=[0.9]", "transformer.betas must have 2 items"),
        ("nonsense.key=1", "unknown key 'nonsense'"),
        ("resources.processes=0", "resources.processes must be positive"),
        ("resources.train.mem_mb=-1", "mem_mb must be positive"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        validate(params(override))


def test_missing_and_unknown_keys_in_a_file(tmp_path):
    broken = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text().replace("  shard_size: 32", "  shardsize: 32")
    broken.write_text(text)
    with pytest.raises(ConfigError, match="unknown key.*data: shardsize"):
        validate(load_params([broken]))
    p = params()
    del p["vqgan"]["beta"]
    with pytest.raises(ConfigError, match=r"missing key\(s\) in vqgan: beta"):
        section(p, "vqgan")
    with pytest.raises(ConfigError, match="unknown section"):
        validate({**params(), "extra": {}})
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_params([tmp_path / "bad.yaml"])


def test_command_line_text_becomes_typed_values():
    assert section(params("vqgan.base_lr=5e-5"), "vqgan").base_lr == 5e-5  # YAML 1.1 reads this as text
    nested = params()
    nested["data"]["size"], nested["masks"]["small"]["hole_range"] = "32", "[0.1, 0.4]"  # snakemake --config
    assert validate(nested)["data"]["size"] == 32
    assert validate(nested)["masks"]["small"]["hole_range"] == [0.1, 0.4]


def test_configs_are_frozen_and_typed():
    cfg = section(params(), "data")
    with pytest.raises(AttributeError):
        cfg.size = 128
    assert isinstance(section(params(), "masks").small.hole_range, tuple)
    assert set(SECTIONS) == set(params())
    with pytest.raises(ConfigError, match="must be a mapping"):
        build(SECTIONS["data"], [1, 2], "data")


def test_defaults_come_from_the_project_folder_else_from_the_package(tmp_path, monkeypatch):
    # One source of truth: the project's params.yaml is a link to the file the package ships.
    assert (REPO / "params.yaml").resolve() == PACKAGED_PARAMS.resolve()
    monkeypatch.chdir(tmp_path)
    assert default_params_file() == PACKAGED_PARAMS
    assert load_params() == load_params([PACKAGED_PARAMS])
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("  size: 64", "  size: 96"))
    assert default_params_file() == Path("params.yaml")
    assert section(load_params(), "data").size == 96
