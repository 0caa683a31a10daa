"""What ``daar-ops select --help`` and the README say about defaults is what a run uses
(issue 22 item 14: ``--quick`` wrote to outputs/daar_select_quick while both said
outputs/daar_select)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import re
from pathlib import Path

import pytest

from daar_ops.cli import build_parser
from daar_ops.pipeline import SelectConfig

REPO = Path(__file__).resolve().parents[1]


def _select_help() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["select", "--help"])
    return re.sub(r"\s+", " ", out.getvalue())


def _select_helps() -> dict[str, str]:
    """{dest: help} of every option of ``daar-ops select``."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a.help for a in sub.choices["select"]._actions}


def test_select_help_states_the_quick_presets_output_dir_and_every_changed_default():
    text, helps = _select_help(), _select_helps()
    full, quick = SelectConfig(), SelectConfig.quick()
    assert f"(default: {full.output_dir}; with --quick: {quick.output_dir})" in text
    changed = [f.name for f in dataclasses.fields(SelectConfig)
               if getattr(quick, f.name) != getattr(full, f.name)]
    assert changed  # what the preset is about
    for name in changed:  # each on its own flag, and in the --quick help
        assert helps[name].endswith(f"; with --quick: {getattr(quick, name)})"), name
        flag = f"--{name.replace('_', '-')} {getattr(quick, name)}"
        assert flag in helps["quick"], name


def test_readme_names_both_output_dirs():
    readme = re.sub(r"\s+", " ", (REPO / "README.md").read_text())
    assert f"default `{SelectConfig().output_dir}`" in readme
    assert f"with `--quick`, `{SelectConfig.quick().output_dir}`" in readme


def test_every_path_and_command_the_readme_names_exists():
    """The README is run as written on a fresh clone: its files, recipes, tools and docs exist, and
    every `daar-ops <command>` is a command of the CLI."""
    from daar_ops.cli import build_parser

    readme = (REPO / "README.md").read_text()
    paths = set(re.findall(r"(?<![\w/.])((?:recipes|docs|tools|scripts|daar_ops)/[\w./-]+\w)",
                           readme))
    assert len(paths) > 15
    missing = [p for p in sorted(paths) if not (REPO / p).exists()]
    assert not missing, missing
    commands = set(re.findall(r"daar-ops ([a-z][a-z0-9-]+)", readme))
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert commands and not commands - set(sub.choices), commands - set(sub.choices)
