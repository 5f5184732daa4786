"""The commands in README.md and docs/*.md run as written, their links resolve, and they name no path of one machine.

How the docs write commands (the convention this test reads):
- Commands are in fenced blocks tagged `bash`, `sh`, `shell` or `console`. A block with any other tag is not run:
  `text` for output, `yaml`, `json` for files.
- In a bash/sh/shell block every line is a command, except blank lines and `#` comments; a trailing `# comment`
  is ignored and a line ending in `\\` goes on with the next. Output never goes in such a block.
- In a console block, only lines starting with `$ ` are commands; the lines after one are its output. A command
  whose output starts with `config error:` must be refused that way: exit code 2 and that line.

How each command is checked, without training anything:
- `make TARGET [VAR=VALUE ...]`: `make -n` with the same arguments, from the repository root, exits 0 (the target
  and variables exist), and every project command it would run (`$(PY) -m ...`) is then checked as below.
- `python -m MODULE ...` (also python3, .venv/bin/python, and `torchrun ... -m MODULE ...`), for a module of the
  project:
  - `launch run` (local or slurm backend) and `launch sweep` whose config or spec is in the repository: run with
    `--dry-run` (added where the docs leave it out), which validates the config, the overrides, the batch layout
    and the memory plan, prints what would run and starts nothing;
  - `launch plan` and `evals benchmarks`: run as written (they only read);
  - anything else: dry-parsed, that is run as __main__ with argparse's parse_args stopping the command (exit 0)
    once its options parsed. A refused option exits 2, as in real use.
  These all run in one interpreter, in a temporary folder that holds a copy of configs/, so nothing is written
  into the checkout.
- Programs in SKIPPED need a cluster, a network, an account or an earlier run, and are skipped. Any other program
  fails the test: a new kind of command in the docs needs a check here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGES = ("data_pipeline", "evals", "launch", "pretrain")
SHELL_TAGS = {"bash", "sh", "shell"}
PYTHONS = {"python", "python3", ".venv/bin/python"}
README_MAX_LINES = 200
SKIPPED = {
    "cd": "changes the reader's shell",
    "export": "changes the reader's shell",
    "git": "needs the network",
    "pip": "needs the network",
    "wandb": "needs a W&B account and the network",
    "sbatch": "needs a SLURM cluster",
    "srun": "needs a SLURM cluster",
    "squeue": "needs a SLURM cluster",
    "scontrol": "needs a SLURM cluster",
    "scancel": "needs a SLURM cluster",
    "tail": "reads the log of a running job",
    "kill": "signals a running process",
    "lm_eval": "another tool, run on a model exported by an earlier command",
}
# Commands run as written: they read configs or installed files and write nothing.
RUN_AS_WRITTEN = {("launch", "plan"), ("evals", "benchmarks")}
# Paths that would only exist on the machine the docs were written on.
MACHINE_PATHS = sorted({"/work/", "/root/", "/home/", str(ROOT), str(Path.home()) + "/"} - {"//"})


@dataclass
class Command:
    """One command of the docs, where it is, and the output the docs show for it."""

    path: Path
    line: int
    text: str
    refused_with: str | None = None  # a `config error:` line the docs show as its output

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def argv(self) -> list[str]:
        words = shlex.split(self.text, comments=True)
        while words and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):  # VAR=value before the program
            words.pop(0)
        return words


@dataclass
class PythonCheck:
    """A project module's command, and how it is checked: "dry-run", "run" or "parse"."""

    key: str
    module: str
    args: list[str]
    mode: str
    refused_with: str | None = None
    result: dict = field(default_factory=dict)


def fences(text: str) -> list[tuple[str, int, list[str]]]:
    """(tag, line number of the block's first line, lines) of each fenced block, indentation removed."""
    blocks, lines, number = [], text.splitlines(), 0
    while number < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})\s*([^\s`]*)", lines[number])
        number += 1
        if not opening:
            continue
        indent, fence, tag = len(opening.group(1)), opening.group(2), opening.group(3).lower()
        start, body = number + 1, []
        while number < len(lines) and not re.match(rf"^\s*{fence[0]}{{{len(fence)},}}\s*$", lines[number]):
            line = lines[number]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            number += 1
        number += 1
        blocks.append((tag, start, body))
    return blocks


def commands_in(path: Path) -> list[Command]:
    found = []
    for tag, start, body in fences(path.read_text()):
        if tag not in SHELL_TAGS | {"console"}:
            continue
        index = 0
        while index < len(body):
            line, first = body[index], start + index
            index += 1
            if tag == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            elif not line.strip() or line.lstrip().startswith("#"):
                continue
            while line.rstrip().endswith("\\") and index < len(body):
                line = line.rstrip()[:-1] + " " + body[index].strip()
                index += 1
            command = Command(path, first, line.strip())
            if tag == "console":
                output = []
                while index < len(body) and not body[index].startswith("$ "):
                    output.append(body[index])
                    index += 1
                if output and output[0].startswith("config error:"):
                    command.refused_with = output[0].strip()
            found.append(command)
    return found


COMMANDS = [command for path in DOCS for command in commands_in(path)]


def python_module_command(argv: list[str]) -> tuple[str, list[str]] | None:
    """(module, arguments) of `python -m module ...` or `torchrun [options] -m module ...`, else None."""
    if argv[0] in PYTHONS and len(argv) > 2 and argv[1] == "-m":
        return argv[2], argv[3:]
    if argv[0] == "torchrun" and "-m" in argv[:-1]:
        at = argv.index("-m")
        return argv[at + 1], argv[at + 2:]
    return None


def option(args: list[str], name: str, default: str | None = None) -> str | None:
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def python_check(key: str, module: str, args: list[str], refused_with: str | None) -> PythonCheck:
    subcommand = args[0] if args else None
    if module == "launch" and subcommand in ("run", "sweep"):
        source = option(args, "--config" if subcommand == "run" else "--spec")
        if option(args, "--backend", "local") != "hostfile" and source and (ROOT / source).is_file():
            dry = args if "--dry-run" in args else [*args, "--dry-run"]
            return PythonCheck(key, module, dry, "dry-run", refused_with)
    if (module, subcommand) in RUN_AS_WRITTEN:
        config = option(args, "--config")
        if config is None or (ROOT / config).is_file():
            return PythonCheck(key, module, args, "run", refused_with)
    return PythonCheck(key, module, args, "parse", refused_with)


def is_project_module(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


# Runs every check in one interpreter: the imports (torch, DeepSpeed) are paid once.
RUNNER = r"""
import argparse, contextlib, io, json, runpy, sys, traceback
from data_pipeline.common import command_line

real_parse_args = argparse.ArgumentParser.parse_args
seen = []

def parse_then_stop(self, *args, **kwargs):
    real_parse_args(self, *args, **kwargs)
    seen.append(isinstance(self, command_line.ArgumentParser))
    raise SystemExit(0)

checks_path, results_path = sys.argv[1], sys.argv[2]
checks = json.load(open(checks_path))
results = {}
for check in checks:
    out, err = io.StringIO(), io.StringIO()
    seen.clear()
    if check["mode"] == "parse":
        argparse.ArgumentParser.parse_args = parse_then_stop
    sys.argv = [check["module"], *check["args"]]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_module(check["module"], run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            err.write(str(stop.code))
    except BaseException:
        code = "exception"
        err.write(traceback.format_exc())
    finally:
        argparse.ArgumentParser.parse_args = real_parse_args
    if check["mode"] == "parse" and code == 0 and seen != [True]:
        code = "not parsed with data_pipeline.common.command_line.ArgumentParser"
    results[check["key"]] = {"rc": code, "stdout": out.getvalue()[-3000:], "stderr": err.getvalue()[-3000:]}
with open(results_path, "w") as file:
    json.dump(results, file)
"""


@dataclass
class Outcome:
    make: subprocess.CompletedProcess | None = None
    checks: list[PythonCheck] = field(default_factory=list)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    """Every command of the docs checked once: make's dry runs here, the Python commands in one interpreter."""
    outcomes: dict[str, Outcome] = {}
    checks: list[PythonCheck] = []
    for command in COMMANDS:
        argv = command.argv
        outcome = outcomes.setdefault(command.where, Outcome())
        if argv[0] == "make":
            outcome.make = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True)
            for number, line in enumerate(outcome.make.stdout.splitlines()):
                try:
                    words = shlex.split(line)
                except ValueError:
                    continue
                found = python_module_command(words) if words else None
                if found and is_project_module(found[0]):
                    outcome.checks.append(python_check(f"{command.where}/{number}", *found, None))
            if outcome.checks:  # the target's own command comes last, after its prerequisites' (make setup)
                outcome.checks[-1].refused_with = command.refused_with
        else:
            found = python_module_command(argv)
            if found and is_project_module(found[0]):
                outcome.checks.append(python_check(command.where, *found, command.refused_with))
        checks += outcome.checks
    work = tmp_path_factory.mktemp("docs")
    shutil.copytree(ROOT / "configs", work / "configs")
    jobs, results = work / "checks.json", work / "results.json"
    jobs.write_text(json.dumps([{"key": c.key, "module": c.module, "args": c.args, "mode": c.mode} for c in checks]))
    runner = subprocess.run([sys.executable, "-c", RUNNER, str(jobs), str(results)], cwd=work, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert runner.returncode == 0, runner.stdout[-3000:] + runner.stderr[-3000:]
    by_key = json.loads(results.read_text())
    for check in checks:
        check.result = by_key[check.key]
    return outcomes


@pytest.mark.parametrize("command", COMMANDS, ids=[command.where for command in COMMANDS])
def test_command_runs_as_written(command: Command, outcomes: dict[str, Outcome]):
    argv = command.argv
    program = argv[0]
    if program in SKIPPED:
        pytest.skip(f"{program}: {SKIPPED[program]}")
    found = python_module_command(argv)
    assert program == "make" or found, (
        f"{command.where}: `{program}` is neither make nor python -m: give it a check in tests/test_docs.py,"
        " or add it to SKIPPED with the reason it cannot run here")
    assert program == "make" or is_project_module(found[0]), f"{command.where}: {found[0]} is not a project module"
    outcome = outcomes[command.where]
    if outcome.make is not None:
        assert outcome.make.returncode == 0, f"{command.where}: make -n failed:\n{outcome.make.stderr}"
    for check in outcome.checks:
        result = check.result
        shown = f"{command.where}: {check.mode} of python -m {check.module} {shlex.join(check.args)}"
        if check.refused_with:
            assert result["rc"] == 2 and check.refused_with in result["stderr"], (
                f"{shown}: the docs show it refused with `{check.refused_with}`, got exit {result['rc']}:\n"
                f"{result['stderr']}")
        else:
            assert result["rc"] == 0, f"{shown}: exit {result['rc']}\n{result['stdout']}\n{result['stderr']}"


def test_fence_tags_are_known():
    # A fence tag misspelled (```bsh) would silently leave a file's commands unchecked.
    for path in DOCS:
        tags = {tag for tag, _, _ in fences(path.read_text())}
        assert tags <= SHELL_TAGS | {"console", "text", "yaml", "json"}, f"{path.name}: unknown fence tags {tags}"
    assert len(COMMANDS) >= 40


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the reference goes in docs/"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def without_fences(text: str) -> str:
    return re.sub(r"^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1[ \t]*$", "", text, flags=re.M | re.S)


def anchors(path: Path) -> set[str]:
    text = without_fences(path.read_text())
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", text, flags=re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    text = without_fences(path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", DOCS, ids=[str(path.relative_to(ROOT)) for path in DOCS])
def test_relative_links_resolve(path: Path):
    broken = []
    for target in links(path):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not broken, f"{path.name}: " + "; ".join(broken)


@pytest.mark.parametrize("path", DOCS, ids=[str(path.relative_to(ROOT)) for path in DOCS])
def test_no_path_of_one_machine(path: Path):
    text = path.read_text()
    found = [machine_path for machine_path in MACHINE_PATHS if machine_path in text]
    assert not found, f"{path.name} names {found}: write a placeholder such as /path/to/gpt-pretrain"
