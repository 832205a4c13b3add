"""Docs kept honest: every command and every shipped filter is documented in the README."""

from pathlib import Path

import click

from dcdb.cli import cli
from dcdb.query import builtin_filters, load_filter

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _commands(group: click.Group, prefix: str = "") -> list[str]:
    out = []
    for name, cmd in group.commands.items():
        full = f"{prefix}{name}"
        out.append(full)
        if isinstance(cmd, click.Group):
            out += _commands(cmd, full + " ")
    return out


def test_every_command_is_in_the_readme():
    missing = [c for c in _commands(cli) if f"dcdb {c}" not in README]
    assert not missing, f"commands not documented in README.md: {missing}"


def test_every_command_has_help():
    ctx = click.Context(cli)
    for name in _commands(cli):
        cmd = cli
        for part in name.split():
            cmd = cmd.get_command(ctx, part)
        assert (cmd.help or "").strip(), name


def test_every_filter_is_documented():
    for name in builtin_filters():
        assert f"`{name}`" in README, f"sql/{name}.sql is not documented in README.md"
        assert load_filter(name).description, f"sql/{name}.sql has no description in its header"


def test_ci_runs_the_whole_suite_and_the_readme_gives_the_fast_loop():
    """`.ci/run` runs the README's test command, which deselects nothing (slow tests included);
    the README names the developers' fast loop."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    ci = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines() if "pytest" in line
          and not line.lstrip().startswith("#")]
    assert ci == ["python -m pytest -q"]
    assert "\npython -m pytest -q\n" in README
    opts = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "-m" not in opts["addopts"].split() and any(m.startswith("slow:") for m in opts["markers"])
    assert '`python -m pytest -q -m "not slow"`' in README
