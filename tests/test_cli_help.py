"""The command line a newcomer reads: --version, help text for every flag with its default, examples."""

import argparse
import subprocess
import sys

import pytest

import maxact
from maxact.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_version_prints_the_package_version():
    res = subprocess.run([sys.executable, "-m", "maxact.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0
    assert res.stdout.strip() == f"maxact {maxact.__version__}"


def test_top_level_help_has_examples_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "analyzer run --samples 200" in out
    assert "2 a user error" in out
    for name in _subparsers(build_parser()):
        assert name in out


@pytest.mark.parametrize("command", ["run", "merge", "quant", "compare-torch", "report", "export", "ranges",
                                     "eval"])
def test_every_flag_has_help_and_shows_its_default(command, capsys):
    parser = _subparsers(build_parser())[command]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), f"{command} {action.dest} has no help text"
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for action in parser._actions:
        if action.option_strings and action.default not in (None, argparse.SUPPRESS) and action.default is not False:
            assert f"(default: {action.default})" in out, f"{command} {action.option_strings[0]}: default not shown"


@pytest.mark.parametrize("argv", [["run", "--seed", "x"], ["run", "--bos", "yes"], ["run", "--shard", "3/2"],
                                  ["report", "r.h5"], ["run", "--sample", "2"]])
def test_argument_errors_are_one_line_and_abbreviations_are_refused(argv, tmp_path, monkeypatch):
    """argparse's own errors: one line, exit 2, nothing run (``--sample`` is not taken for ``--samples``)."""
    monkeypatch.chdir(tmp_path)
    res = subprocess.run([sys.executable, "-m", "maxact.cli", *argv], capture_output=True, text=True)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: analyzer"), res.stderr
    assert not list(tmp_path.iterdir())
