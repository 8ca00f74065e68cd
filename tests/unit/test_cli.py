"""The console command: help for every subcommand, flags from the environment, clear errors."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from recstack import flags
from recstack.cli import build_parser

CONTRACT_SUBCOMMANDS = ("stream", "replay", "train", "serve")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_contract_subcommands_exist_and_have_help():
    subs = _subcommands(build_parser())
    for name in CONTRACT_SUBCOMMANDS:
        assert name in subs, f"recstack {name} is missing"
    for name, sub in subs.items():
        text = sub.format_help()
        assert "RECSTACK_" in text, f"recstack {name} --help does not name its environment variables"


@pytest.mark.parametrize(
    ("sub", "flag"),
    [
        ("stream", "--bootstrap"),
        ("stream", "--redis"),
        ("stream", "--group"),
        ("replay", "--source"),
        ("replay", "--rate"),
        ("replay", "--limit"),
        ("train", "--events"),
        ("train", "--until"),
        ("train", "--out"),
        ("serve", "--port"),
        ("serve", "--models"),
        ("serve", "--redis"),
        ("serve", "--naive"),
    ],
)
def test_contract_flags(sub, flag):
    sub_parser = _subcommands(build_parser())[sub]
    assert any(flag in a.option_strings for a in sub_parser._actions), f"recstack {sub} lacks {flag}"


def test_help_runs_as_a_process():
    out = subprocess.run([sys.executable, "-m", "recstack.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for name in CONTRACT_SUBCOMMANDS:
        assert name in out.stdout


def test_flag_reads_environment_and_command_line_wins(monkeypatch):
    monkeypatch.setenv("RECSTACK_MAX_THINGS", "7")
    parser = argparse.ArgumentParser()
    flags.add_flag(parser, "--max-things", type=flags.positive_int, default=3, help="things")
    assert parser.parse_args([]).max_things == 7
    assert parser.parse_args(["--max-things", "9"]).max_things == 9


def test_bad_environment_value_names_the_variable(monkeypatch, capsys):
    monkeypatch.setenv("RECSTACK_MAX_THINGS", "-1")
    parser = argparse.ArgumentParser()
    with pytest.raises(SystemExit):
        flags.add_flag(parser, "--max-things", type=flags.positive_int, default=3, help="things")
    assert "RECSTACK_MAX_THINGS" in capsys.readouterr().err


def test_bad_flag_value_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--port", "notaport"])
    assert "--port" in capsys.readouterr().err


def test_switch_from_environment(monkeypatch):
    monkeypatch.setenv("RECSTACK_NAIVE", "true")
    parser = argparse.ArgumentParser()
    flags.add_flag(parser, "--naive", type=None, default=False, help="baseline")
    assert parser.parse_args([]).naive is True
