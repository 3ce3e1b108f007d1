"""Every subcommand's --help renders (argparse %-formats help texts; a stray % breaks it)."""

from __future__ import annotations

import pytest

from reapi_worker.worker import cli

SUBCOMMANDS = ["capabilities", "bot", "config", "run-action", "execute"]


@pytest.mark.parametrize("command", [[], *[[name] for name in SUBCOMMANDS]])
def test_help_renders_and_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: reapi-worker")
    if command == ["bot"]:
        assert "(default: '10%')" in out  # a percentage shows as itself
