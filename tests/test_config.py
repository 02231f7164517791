"""Config machinery: defaults < TOML < flags, errors that name the key, secrets never saved."""

from __future__ import annotations

import argparse
from typing import Literal

import pytest
from pydantic import Field

from selfinstruct.config import Section, add_arguments, config_to_toml, load_toml, redact, resolve
from selfinstruct.errors import UserError


class Inner(Section):
    backend: Literal["openai", "vllm"] = Field("openai", json_schema_extra={"flag": "--teacher"})
    model: str = "m0"
    base_url: list[str] = Field(default_factory=list)
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 32
    note: str = Field("", json_schema_extra={"flag": None})


class Outer(Section):
    seeds: str | None = Field(None, json_schema_extra={"positional": True})
    out: str = "outputs/run"
    num_instructions: int = 100
    temperature: float = 0.7
    structured: bool = False
    teacher: Inner = Inner()


def parse(argv: list[str]) -> dict:
    p = argparse.ArgumentParser()
    add_arguments(p, Outer)
    return vars(p.parse_args(argv))


def test_defaults_when_nothing_given():
    cfg = resolve("generate", Outer, parse([]))
    assert cfg == Outer()


def test_toml_overrides_defaults_and_flags_override_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[generate]\nnum_instructions = 50\ntemperature = 0.2\n[teacher]\nmodel = "from-toml"\nconcurrency = 4\n'
    )
    data = load_toml(toml)
    cfg = resolve(
        "generate", Outer, parse(["--num-instructions", "7", "--model", "from-flag"]), data, str(toml)
    )
    assert cfg.num_instructions == 7  # flag wins
    assert cfg.temperature == 0.2  # TOML wins over default
    assert cfg.teacher.model == "from-flag"
    assert cfg.teacher.concurrency == 4
    assert cfg.out == "outputs/run"


def test_nested_flags_flattened_with_custom_flag_names():
    cfg = resolve("generate", Outer, parse(["--teacher", "vllm", "--base-url", "http://a/v1,http://b/v1"]))
    assert cfg.teacher.backend == "vllm"
    assert cfg.teacher.base_url == ["http://a/v1", "http://b/v1"]
    cfg = resolve("generate", Outer, parse(["--base-url", "http://a/v1", "--base-url", "http://b/v1"]))
    assert cfg.teacher.base_url == ["http://a/v1", "http://b/v1"]


def test_bool_flags_and_positional():
    cfg = resolve("generate", Outer, parse(["seeds.jsonl", "--structured"]))
    assert cfg.structured is True and cfg.seeds == "seeds.jsonl"
    assert resolve("generate", Outer, parse(["--no-structured"])).structured is False


def test_bad_flag_value_names_the_flag():
    with pytest.raises(UserError, match=r"num_instructions from --num-instructions.*'abc'"):
        resolve("generate", Outer, parse(["--num-instructions", "abc"]))
    with pytest.raises(UserError, match=r"teacher.backend from --teacher"):
        resolve("generate", Outer, parse(["--teacher", "nope"]))


def test_unknown_toml_key_names_the_key(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[teacher]\nmodle = 'x'\n")
    with pytest.raises(UserError, match=r"unknown key 'modle' in \[teacher\]"):
        resolve("generate", Outer, {}, load_toml(toml), str(toml))
    toml.write_text("[generate]\nnum_instructons = 3\n")
    with pytest.raises(UserError, match=r"unknown key 'num_instructons' in \[generate\]"):
        resolve("generate", Outer, {}, load_toml(toml), str(toml))


def test_bad_toml_value_and_syntax(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[generate]\ntemperature = 'hot'\n")
    with pytest.raises(UserError, match=r"invalid setting temperature from .*run.toml \[generate\]"):
        resolve("generate", Outer, {}, load_toml(toml), str(toml))
    toml.write_text("[generate\n")
    with pytest.raises(UserError, match=r"run.toml: invalid TOML"):
        load_toml(toml)
    with pytest.raises(UserError, match="config file not found"):
        load_toml(tmp_path / "missing.toml")


def test_saved_config_round_trips_and_redacts(tmp_path):
    cfg = resolve("generate", Outer, parse(["--base-url", "https://user:hunter2@host/v1", "--model", "x"]))
    text = config_to_toml("generate", cfg)
    assert "hunter2" not in text and "user:***@host" in text
    assert 'api_key_env = "OPENAI_API_KEY"' in text  # env var *names* are fine to keep
    (tmp_path / "saved.toml").write_text(text)
    again = resolve("generate", Outer, {}, load_toml(tmp_path / "saved.toml"), "saved.toml")
    assert again.teacher.model == "x" and again.num_instructions == cfg.num_instructions


def test_redact_masks_secret_looking_keys():
    assert redact({"api_key": "sk-123", "token": "t", "nested": {"password": "p"}, "api_key_env": "K"}) == {
        "api_key": "***",
        "token": "***",
        "nested": {"password": "***"},
        "api_key_env": "K",
    }


def test_toml_only_field_has_no_flag(tmp_path):
    with pytest.raises(SystemExit):
        parse(["--note", "x"])
    toml = tmp_path / "run.toml"
    toml.write_text("[teacher]\nnote = 'from toml'\n")
    assert resolve("generate", Outer, {}, load_toml(toml), str(toml)).teacher.note == "from toml"
