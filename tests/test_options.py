"""Options as objects: the SDK's keywords land on ClientConfig / GenerationOptions, the adapter rule, and the CLI's
flags whose defaults come from the same dataclasses (no second copy to drift)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from typer.main import get_command
from typer.testing import CliRunner

from torchnode.cli import app
from torchnode.cli_options import ClientFlags, LimitFlags, RelayFlags, SwarmFlags, size_text
from torchnode.cli_serve import DashboardFlags
from torchnode.client.config import ClientConfig, GenerationOptions, chosen_adapter, split_options
from torchnode.coordinator.dashboard import DashboardConfig
from torchnode.node.config import SwarmConfig
from torchnode.node.limits import Limits, RelayLimits, parse_bytes

COMMANDS = get_command(app).commands


def test_keywords_users_pass_land_on_the_two_objects():
    config, generation = split_options({"wire_dtype": torch.bfloat16, "verify": True, "draft": "ngram"})
    assert config == ClientConfig(wire_dtype=torch.bfloat16, verify=True)
    assert generation == GenerationOptions(draft="ngram")
    base = ClientConfig(step_timeout=5.0)
    assert split_options({"push": False}, base)[0] == ClientConfig(step_timeout=5.0, push=False)  # laid over
    with pytest.raises(TypeError, match="bogus"):
        split_options({"bogus": 1})


def test_bad_values_fail_when_made_naming_the_option():
    for bad, word in ((dict(verify_window=0), "verify_window"), (dict(wire_dtype="int8"), "wire_dtype")):
        with pytest.raises(ValueError, match=word):
            ClientConfig(**bad)
    with pytest.raises(ValueError, match="draft_tokens"):
        GenerationOptions(draft_tokens=-1)


def test_adapter_rule():
    assert chosen_adapter(None, None) == ""  # no default: the base model
    assert chosen_adapter(None, "tone") == "tone"  # None: the model's default
    assert chosen_adapter("", "tone") == ""  # "": the base model, whatever the default
    assert chosen_adapter("other", "tone") == "other"
    options = GenerationOptions(draft="ngram", adapter="tone").override(draft_tokens=3, adapter="")
    assert (options.draft, options.draft_tokens, options.adapter) == ("ngram", 3, "")


def _defaults(command: str) -> dict[str, object]:
    return {p.name: p.default for p in COMMANDS[command].params}


def test_flag_defaults_are_the_dataclasses_defaults():
    join = _defaults("join")
    assert parse_bytes(join["cache_memory"]) == Limits.cache_bytes
    assert parse_bytes(join["max_message_size"]) == Limits.max_message_bytes
    assert join["batch_wait_ms"] / 1000 == Limits.batch_wait
    assert LimitFlags().limits() == Limits()  # every limit flag at its default gives the node's default limits
    assert RelayFlags(relay=True).limits() == RelayLimits()
    assert SwarmFlags(new_swarm=True).config(RelayFlags()) == SwarmConfig()
    for command in ("generate", "chat", "api"):
        flags = _defaults(command)
        assert flags["step_timeout"] == ClientConfig.step_timeout and flags["draft_tokens"] == 8
    assert ClientFlags().sdk_options()["config"] == ClientConfig()
    assert ClientFlags().sdk_options()["generation"] == GenerationOptions()
    assert size_text(1 << 30) == "1GiB" and size_text(1000) == "1000"
    assert DashboardFlags().config(insecure=False) == DashboardConfig()  # the dashboard's flags at their defaults


def test_each_group_is_one_parameter_of_the_command_and_its_flags_for_typer():
    groups = (
        (LimitFlags, "join"),
        (RelayFlags, "coordinator"),
        (ClientFlags, "api"),
        (DashboardFlags, "coordinator"),
        (DashboardFlags, "dashboard"),
    )
    for group, command in groups:
        flags = {p.name for p in COMMANDS[command].params}
        assert {f.name for f in dataclasses.fields(group)} <= flags


@pytest.mark.parametrize(
    "args, flag",
    [
        (["join", "default", "--new-swarm", "--initial-peers", "/ip4/1.2.3.4/tcp/1/p2p/x"], "--new-swarm"),
        (["join", "default", "--relay"], "--relay"),
        (["join", "default", "--max-sessions", "0"], "--max-sessions"),
        (["join", "default", "--new-swarm", "--cache-memory", "lots"], "--cache-memory"),
        (["join", "default", "--new-swarm", "--reachable", "maybe"], "--reachable"),
        (["generate", "default", "hi"], "--initial-peers"),
        (["api", "default", "--peers", "127.0.0.1:1", "--wire-dtype", "int3"], "--wire-dtype"),
        (["coordinator", "--relay", "--relay-bytes-per-second", "0"], "--relay-bytes-per-second"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(args, flag):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert flag in result.output and "Traceback" not in result.output
