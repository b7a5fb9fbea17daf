"""The console entry point: typer's own usage errors also end as one `error:` line with exit code 2; a bug keeps
its traceback and exits with code 1."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import llamaprune
import llamaprune.plan.sql
from llamaprune.cli.app import app

ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize(
    "args, says, help_of",
    [
        (["eval", "m", "--dtype", "float64"], "'float64' is not one of 'float32', 'bfloat16', 'float16'", "eval"),
        (["plan"], "Missing argument 'RUN_DIR'", "plan"),
        (["bogus"], "No such command 'bogus'", ""),
        (["plan", "x", "--ratio", "abc"], "a valid ", "plan"),  # "not a valid float" / "be a valid number": by typer
        (["plan", "x", "--ratio", "abc"], "Invalid value for '--ratio'", "plan"),  # the option is named
    ],
)
def test_usage_errors_are_one_line(args, says, help_of):
    """One line on stderr: what is wrong, then where the help is (the command's own, when there is one)."""
    done = cli(*args)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr
    assert lines[0].endswith(f" (see `{' '.join(['cli.py', help_of]).strip()} --help`)"), lines[0]


# The commands, in the order the README's table and the help list them.
COMMANDS = ["eval", "score", "plan", "sql", "apply", "export", "finetune", "prune", "refresh-code"]


def listed_commands(help_text: str) -> list[str]:
    """The command names of the help's Commands section (rich's box or click's plain list)."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if "Commands" in line)
    names = []
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith("╰"):
            break
        match = re.match(r"^[│ ] ?([a-z][\w-]*) {2,}\S", line)
        if match:
            names.append(match.group(1))
    return names


def test_help_and_no_arguments_print_the_usage_and_every_command():
    done = cli("--help")
    assert done.returncode == 0 and done.stderr == ""
    assert "Usage: cli.py [OPTIONS] COMMAND [ARGS]..." in [line.strip() for line in done.stdout.splitlines()]
    assert app.info.help in re.sub(r"[\s│]+", " ", done.stdout)
    assert listed_commands(done.stdout) == COMMANDS
    bare = cli()
    assert bare.returncode == 0 and bare.stderr == ""
    assert bare.stdout == done.stdout  # no arguments: the same help, not an error


def test_version_prints_the_version_alone():
    done = cli("--version")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{llamaprune.__version__}\n", "")


BROADCAST = "operands could not be broadcast together with shapes (3,) (4,)"


def test_a_bug_is_a_traceback_with_exit_code_1_not_an_error_line(tmp_path):
    """A plain ValueError from inside a command (a numpy-style one, from the query) is not bad input."""
    code = (
        "import sys\n"
        "import llamaprune.plan.sql\n"
        "def broken(run_dir, query):\n"
        f"    raise ValueError({BROADCAST!r})\n"
        "llamaprune.plan.sql.run_query = broken\n"
        "from llamaprune.cli.app import main\n"
        f"sys.argv = ['llamaprune', 'sql', {str(tmp_path)!r}, 'SELECT 1']\n"
        "main()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and f"ValueError: {BROADCAST}" in done.stderr.splitlines()[-1]
    assert not any(line.startswith("error:") for line in done.stderr.splitlines()), done.stderr


def test_the_cli_runner_sees_the_bug_too(tmp_path, monkeypatch):
    def broken(run_dir, query):
        raise ValueError(BROADCAST)

    monkeypatch.setattr(llamaprune.plan.sql, "run_query", broken)
    result = CliRunner().invoke(app, ["sql", str(tmp_path), "SELECT 1"])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert str(result.exception) == BROADCAST
    assert "error:" not in result.output


@pytest.mark.parametrize("command", ["eval", "apply", "prune"])
def test_help_names_the_eval_extra_whole(command):
    """Rich markup would read [eval] as a style tag and print `pip install 'llamaprune'`."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    assert "pip install 'llamaprune[eval]'" in result.output
    assert "\\[" not in result.output


def help_texts(command):
    yield command.name, command.help or ""
    for param in command.params:
        yield f"{command.name} {param.name}", getattr(param, "help", None) or ""
    for sub in getattr(command, "commands", {}).values():
        yield from help_texts(sub)


def test_no_help_text_loses_characters_to_rich_markup():
    """typer renders help as rich markup: an unescaped [word] would vanish as a style tag."""
    from rich.markup import render

    for where, text in help_texts(typer.main.get_command(app)):
        assert render(text).plain == text.replace("\\[", "["), where
