"""fedclip.config: flat settings (``--set`` and Flower's run config) read in one place; prompt
templates, presets, split fractions and environment values checked wherever they come from."""

from __future__ import annotations

import pytest

from fedclip.config import MAX_TEMPLATE_CHARS, RunConfig, flat_settings, parse_settings, setting_key
from fedclip.errors import ConfigError, DataError
from tests.conftest import one_line_error


def test_setting_keys_take_either_spelling():
    assert setting_key("train-fraction") == setting_key("train_fraction") == "train_fraction"
    assert setting_key(" fedprox.mu ") == "fedprox.mu"
    assert setting_key("fedpft.num-components") == "fedpft.num_components"  # an option's key
    assert setting_key("fedprox-cnn.image-size") == "fedprox-cnn.image_size"  # not its name


def test_the_command_line_and_a_flower_run_config_read_settings_alike():
    """The same settings as ``--set`` strings and as a Flower run config (typed values, lists
    as one string) give the same RunConfig."""
    from fedclip.cli import _settings
    from fedclip.flower.settings import run_config_to_cfg

    cli = _settings(None, ["train-fraction=0.5", "fedprox.mu=0.25", "algorithm='fedprox'",
                           "classes=dog, cat", "prompt-templates=a {}|the {} ", "seed=3",
                           "train_clients_together=true"])
    flower, _ = run_config_to_cfg({"train-fraction": 0.5, "fedprox.mu": 0.25,
                                   "algorithm": "fedprox", "classes": "dog, cat",
                                   "prompt-templates": "a {}|the {} ", "seed": 3,
                                   "train-clients-together": True})
    assert cli == flower
    assert cli.classes == ("dog", "cat") and cli.prompt_templates == ("a {}", "the {} ")
    assert cli.options == {"fedprox": {"mu": 0.25}} and cli.train_fraction == 0.5
    assert cli.seed == 3 and cli.train_clients_together is True


def test_a_list_may_be_a_toml_array_or_one_string():
    assert RunConfig.validated(parse_settings(['classes=["a", "b"]'])).classes == ("a", "b")
    assert parse_settings(["classes=a,b"]) == {"classes": ("a", "b")}
    assert flat_settings({"classes": "", "prompt-templates": " | "}) == {
        "classes": None, "prompt_templates": None}
    assert parse_settings(["lr=1e-4", "name=plain text"]) == {"lr": 1e-4, "name": "plain text"}


def test_a_setting_without_a_value_is_one_line():
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_settings(["lr"])
    with pytest.raises(ConfigError, match="lr"):  # a string is not a float (strict)
        RunConfig.validated(parse_settings(["lr='1e-4'"]))


@pytest.mark.parametrize(("template", "why"), [
    ("{0.__class__.__mro__} {}", "exactly one"),
    ("{:>30000000}", "exactly one"),
    ("a {} and a {}", "exactly one"),
    ("a {!r}", "exactly one"),
    ("a {name}", "exactly one"),
    ("a photo of {", "unbalanced"),
    ("a photo", "exactly one"),
    ("{}" + "x" * MAX_TEMPLATE_CHARS, "longer than"),
])
def test_a_prompt_template_with_anything_but_one_plain_field_is_refused(template, why):
    with pytest.raises(ConfigError, match=why):
        RunConfig.build(prompt_template=template)
    with pytest.raises(ConfigError, match=why):
        RunConfig.build(prompt_templates=("a {}", template))


def test_plain_templates_and_literal_braces_are_accepted():
    cfg = RunConfig.build(prompt_template="a {{sketch}} of a {}.",
                          prompt_templates=("@openai-imagenet", "itap of a {}."))
    assert cfg.prompt_template.format("dog") == "a {sketch} of a dog."
    with pytest.raises(ConfigError, match="unknown prompt ensemble"):
        RunConfig.build(prompt_templates=("@imagenet-ish",))


def test_a_template_in_a_preset_is_refused_before_anything_runs(tmp_path, capsys):
    preset = tmp_path / "p.toml"
    preset.write_text('prompt_template = "{0.__class__} {}"\n')
    line = one_line_error(capsys, ["run", "--config", str(preset), "--backbone", "standin",
                                   "--out", str(tmp_path / "r")])
    assert "prompt template" in line and not (tmp_path / "r").exists()


def test_split_fractions_that_leave_a_client_without_training_data(toy_root, capsys,
                                                                   tmp_path):
    line = one_line_error(capsys, ["run", "--data-root", str(toy_root), "--backbone",
                                   "standin", "--set", "train_fraction=0.01", "--out",
                                   str(tmp_path / "r")])
    assert "no training image" in line and "train_fraction" in line
    with pytest.raises(ConfigError, match="val_fraction"):
        RunConfig.build(val_fraction=0.0)


def test_a_preset_that_is_not_utf8_text_is_one_line(tmp_path, capsys):
    preset = tmp_path / "bin.toml"
    preset.write_bytes(b"\xff\xfe rounds = 1\n")
    line = one_line_error(capsys, ["run", "--config", str(preset), "--out",
                                   str(tmp_path / "r")])
    assert "not UTF-8" in line


def test_environment_values_are_parsed_as_people_write_them(monkeypatch, tmp_path):
    from fedclip.config import env_flag
    from fedclip.features import default_cache_dir

    monkeypatch.setenv("FEDCLIP_CACHE", "")
    assert default_cache_dir() == default_cache_dir().home() / ".cache" / "fedclip"
    monkeypatch.setenv("FEDCLIP_CACHE", "~/x")
    assert default_cache_dir() == default_cache_dir().home() / "x"
    for value, on in [("false", False), ("0", False), ("no", False), ("", False),
                      ("1", True), ("TRUE", True), ("yes", True)]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert env_flag("HF_HUB_OFFLINE") is on, value
    with pytest.raises(DataError):
        from fedclip.data.folder import scan_dataset

        scan_dataset(tmp_path / "nothing")
