"""The command line: its version, and help that names every option's default."""

from __future__ import annotations

import argparse

import pytest

import latent_inpaint
from latent_inpaint.cli import build_parser, main


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser, **sub.choices}


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"latent-inpaint {latent_inpaint.__version__}"


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_option_has_help_that_shows_its_default(name):
    """Each option's help line says what it does and its default (a value, or what serves
    instead); required options say so; positionals say what they are."""
    parser = commands()[name]
    formatter = parser._get_formatter()
    options = [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction,
                                                                argparse._SubParsersAction))]
    assert options or name == ""
    for action in options:
        text = " ".join(formatter._format_action(action).split())
        label = action.option_strings[0] if action.option_strings else action.dest
        assert action.help, f"{name} {label}: no help"
        if action.option_strings:
            assert "default" in text or "required" in text, f"{name} {label}: no default shown: {text}"
        if "default" not in action.help and action.default not in (None, False, argparse.SUPPRESS):
            assert str(action.default) in text, f"{name} {label}: the default {action.default!r} is not shown: {text}"
    assert "default: None" not in parser.format_help()


def test_help_of_every_command_renders():
    for name, parser in commands().items():
        assert parser.format_help().startswith("usage: latent-inpaint")
