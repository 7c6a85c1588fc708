"""fedclip.config: flat settings (``--set`` and Flower's run config) read in one place."""

from __future__ import annotations

import pytest

from fedclip.config import RunConfig, flat_settings, parse_settings, setting_key
from fedclip.errors import ConfigError


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
