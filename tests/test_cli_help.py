"""Every flag of every subcommand explains itself in --help and names its environment variable."""

from __future__ import annotations

import argparse

import pytest

from swarm.cli import build_parser


def _subcommands(
    parser: argparse.ArgumentParser | None = None, prefix: str = ""
) -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command by its name, `swarm keys create` as "keys create"."""
    parser = parser or build_parser()
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found.update(_subcommands(sub, f"{prefix}{name} "))
    return found


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_flag_has_help_and_an_env_var(name):
    parser = _subcommands()[name]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if not action.option_strings:  # a positional (a key id) is no setting to take from the environment
            assert len(action.help or "") >= 10, f"{name} {action.dest}: help says nothing"
            continue
        text = action.help or ""
        assert "[env: SWARM_" in text, f"{name} {action.option_strings}: no env var in help"
        assert len(text.split("[env:")[0].strip()) >= 10, f"{name} {action.option_strings}: help says nothing"
    assert parser.format_help()  # renders (a bad %-format in a help string raises here)


def test_new_operational_flags_parse():
    args = build_parser().parse_args(["--log-format", "json", "peer", "--model", "m", "--blocks", "0:2",
                                      "--metrics-port", "0"])  # fmt: skip
    assert args.log_format == "json" and args.metrics_port == 0
    assert build_parser().parse_args(["peer", "--model", "m", "--blocks", "0:2"]).metrics_port is None  # off
    assert build_parser().parse_args(["gateway", "--model", "m", "--log-prompts"]).log_prompts is True
    assert build_parser().parse_args(["gateway", "--model", "m"]).log_prompts is False
    assert build_parser().parse_args(["status", "--gateway", "http://x:1"]).gateway == "http://x:1"
