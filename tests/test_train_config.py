"""YAML -> typed dataclasses: overrides, unknown keys and bad values named in one-line errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from ldm.train.config import OptimConfig, UNetStageConfig, VAEStageConfig, load_config
from ldm.train.config_io import to_dict
from ldm.train.optim import lr_factor

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_map_onto_typed_fields(tmp_path):
    path = write(tmp_path, """
stage: unet
vae: /some/vae
unet: {block_out_channels: [32, 64], attention_levels: [true, false], num_heads: [2, 4]}
schedule: {prediction_type: v_prediction}
optim: {learning_rate: 1e-4}
train: {batch_size: 4}
""")
    cfg = load_config(path, ["train.batch_size=8", "unet.block_out_channels=[16,32]", "diffusion.min_snr_gamma=5",
                             "validation.prompts=[a cat, a dog]", "data.path=/d"])
    assert isinstance(cfg, UNetStageConfig)
    assert cfg.train.batch_size == 8 and cfg.unet.block_out_channels == [16, 32] and cfg.unet.num_heads == [2, 4]
    assert cfg.optim.learning_rate == pytest.approx(1e-4)  # YAML reads "1e-4" as a string; still a float here
    assert isinstance(cfg.diffusion.min_snr_gamma, float) and cfg.diffusion.min_snr_gamma == 5.0
    assert cfg.schedule.prediction_type == "v_prediction"
    assert cfg.validation.prompts == ["a cat", "a dog"] and cfg.data.path == "/d"
    # YAML 1.2 booleans: `no` stays the string accelerate expects, not False
    assert load_config(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    text = "stage: unet\nvae: v\ntrain: {mixed_precision: no, progress: false}\n"
    assert load_config(write(tmp_path, text)).train.progress is False
    # the dict form round-trips
    assert to_dict(load_config(None, base=to_dict(cfg))) == to_dict(cfg)


@pytest.mark.parametrize("text, overrides, message", [
    ("stage: unet\nvae: v\ntrain: {batch_sise: 2}\n", [], "unknown config key 'train.batch_sise'"),
    ("stage: unet\nvae: v\nunet: {chanels: 3}\n", [], "unknown config key 'unet.chanels'"),
    ("stage: unet\nvae: v\nbogus: 1\n", [], "unknown config key 'bogus'"),
    ("stage: unet\nvae: v\n", ["data.nope=1"], "unknown config key 'data.nope'"),
    ("stage: unet\nvae: v\n", ["train.batch_size=two"], "train.batch_size: expected an integer"),
    ("stage: unet\nvae: v\n", ["train.mixed_precision=fp8"], "train.mixed_precision must be one of"),
    ("stage: unet\nvae: v\n", ["train.max_steps=0"], "train.max_steps must be > 0"),
    ("stage: unet\nvae: v\n", ["schedule.prediction_type=x0"], "prediction_type"),
    ("stage: unet\nvae: v\n", ["train=3"], "train: expected a mapping"),
    ("stage: unet\nvae: v\ntrain: {batch_size: 2}\n", ["train.batch_size.x=3"], "'train.batch_size' is not a section"),
    ("stage: unet\nvae: v\n", ["train.batch_size.x=3"], "train.batch_size: expected an integer, got {'x': 3}"),
    ("stage: unet\nvae: v\n", ["noequals"], "--set expects key=value"),
    ("stage: gan\n", [], "unknown stage 'gan'"),
    ("stage: unet\n", [], "needs 'vae'"),
    ("stage: unet\nvae: v\ntext_encoder: {kind: openclip}\n", [], "text_encoder.kind must be one of clip, t5"),
    ("stage: vae\ndata: {resolution: 30}\nvae: {block_out_channels: [8, 16, 16]}\n", [],
     "multiple of the VAE factor 4"),
    ("- a\n- b\n", [], "top level must be a mapping"),
    ("stage: [unet\n", [], "not valid YAML"),
])
def test_bad_configs_fail_with_one_line_naming_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ValueError) as e:
        load_config(write(tmp_path, text), overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_base_chains_deep_merge_relative_to_each_file(tmp_path):
    """`base:` is read relative to the file naming it; nested mappings merge, lists/scalars/null replace;
    overrides and the caller's mapping still apply on top and underneath."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("""
stage: unet
vae: runs/vae
unet: {block_out_channels: [32, 64], attention_levels: [false, true], num_heads: 2}
train: {batch_size: 4, seed: 1}
diffusion: {min_snr_gamma: 5.0, debiased_estimation: true}
validation: {prompts: [a, b, c]}
""")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\ntrain: {seed: 2}\nvalidation: {prompts: [d]}\n")
    (tmp_path / "sub" / "leaf.yaml").write_text(
        "base: mid.yaml\nunet: {attention_levels: [true, true]}\ndiffusion: {min_snr_gamma: null}\n")
    cfg = load_config(tmp_path / "sub" / "leaf.yaml", ["train.max_steps=7"])
    assert cfg.unet.block_out_channels == [32, 64] and cfg.unet.attention_levels == [True, True]
    assert cfg.unet.num_heads == 2 and cfg.vae == "runs/vae"
    assert (cfg.train.batch_size, cfg.train.seed, cfg.train.max_steps) == (4, 2, 7)
    assert cfg.diffusion.min_snr_gamma is None and cfg.diffusion.debiased_estimation
    assert cfg.validation.prompts == ["d"]
    under = load_config(tmp_path / "sub" / "mid.yaml", base={"train": {"log_every": 3, "seed": 9}})
    assert (under.train.log_every, under.train.seed) == (3, 2)  # the file wins over the caller's mapping


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "config bases form a cycle (a.yaml -> b.yaml -> a.yaml)"),
    ({"a.yaml": "base: a.yaml\n"}, "cycle"),
    ({"a.yaml": "base: nowhere.yaml\n"}, "base nowhere.yaml not found"),
    ({"a.yaml": "base: [x]\n"}, "base must name a config file"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "stage: unet\nvae: v\ntrain: {bach_size: 2}\n"},
     "unknown config key 'train.bach_size'"),
])
def test_bad_bases_fail_with_one_line(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError) as e:
        load_config(tmp_path / "a.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_shipped_stage_configs_state_only_their_changes():
    """Each U-Net stage after stage 2 names its predecessor as `base` and repeats no value of it."""
    from ldm.train.config_io import read_config, read_yaml

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    paths = [*sorted((REPO / "configs").glob("default_unet_*.yaml")),
             *sorted((REPO / "configs" / "experiments").glob("*.yaml"))]
    assert len(paths) >= 10
    for path in paths:
        own = read_yaml(path)
        assert "base" in own, path
        inherited = dict(leaves(read_config(path.parent / own.pop("base"))))
        repeated = [k for k, v in leaves(own) if k in inherited and inherited[k] == v]
        assert not repeated, f"{path.name} repeats {repeated}"


def test_shipped_configs_load():
    configs = sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "configs" / "experiments").glob("*.yaml")])
    assert {p.name for p in configs} >= {"default_vae.yaml", "default_unet.yaml"}
    for path in configs:
        cfg = load_config(path)
        assert isinstance(cfg, (UNetStageConfig, VAEStageConfig)), path
    unet = load_config(REPO / "configs" / "default_unet.yaml")
    assert unet.unet.cross_attention_dim == 384 and unet.text_encoder.kind == "minilm"
    assert unet.text_encoder.num_layers is None  # stages 2-3 condition on the last layer, stage 4 on layer 3
    assert load_config(REPO / "configs" / "default_unet_layer3.yaml").text_encoder.num_layers == 3
    stage5 = load_config(REPO / "configs" / "default_unet_debiased.yaml")
    assert stage5.diffusion.debiased_estimation and stage5.text_encoder.num_layers == 3
    assert not unet.diffusion.debiased_estimation  # off unless a config asks for it
    vae = load_config(REPO / "configs" / "default_vae.yaml")
    assert vae.vae.latent_channels == unet.unet.in_channels == 4


def test_lr_schedule_warmup_then_decay():
    cos = OptimConfig(warmup_steps=4, decay="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, cos, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cos, 12) == pytest.approx(1.0)
    assert lr_factor(8, cos, 12) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert lr_factor(12, cos, 12) == pytest.approx(0.1) and lr_factor(50, cos, 12) == pytest.approx(0.1)
    lin = OptimConfig(decay="linear")
    assert lr_factor(5, lin, 10) == pytest.approx(0.5)
    assert lr_factor(7, OptimConfig(), 10) == 1.0


def test_unet_stage_refuses_schedules_it_could_not_finish():
    """Checked before the first step: an eps model on a zero-terminal-SNR schedule, and a validation
    sampler that cannot sample the schedule, would otherwise fail hours in."""
    from dataclasses import replace

    from ldm.sampling.schedule import NoiseSchedule
    from ldm.train.config import ValidationConfig
    from ldm.train.stage_unet import check_schedule

    zsnr = NoiseSchedule(prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0,
                         rescale_betas_zero_snr=True)
    cfg = UNetStageConfig(vae="runs/vae", validation=ValidationConfig(prompts=["a red circle"], sampler="heun"))
    for schedule, message in ((replace(zsnr, prediction_type="epsilon"), "v_prediction"), (zsnr, "validation: sampler heun")):
        with pytest.raises(ValueError, match=message) as err:
            check_schedule(schedule, cfg)
        assert len(str(err.value).splitlines()) == 1
    check_schedule(zsnr, replace(cfg, validation=ValidationConfig(prompts=["a red circle"])))  # dpmpp_2m: fine
    check_schedule(zsnr, replace(cfg, validation=ValidationConfig(sampler="heun")))  # no prompts: never samples
    from ldm.train.config import DiffusionConfig

    with pytest.raises(ValueError, match="edit_min_timestep must be below the schedule's 1000 timesteps"):
        check_schedule(NoiseSchedule(), replace(cfg, validation=ValidationConfig(),
                                                diffusion=DiffusionConfig(edit_min_timestep=1000)))
    check_schedule(NoiseSchedule(), replace(cfg, validation=ValidationConfig(),
                                            diffusion=DiffusionConfig(edit_min_timestep=999)))
    with pytest.raises(ValueError, match="edit_min_timestep must be >= 0"):
        DiffusionConfig(edit_min_timestep=-1)
