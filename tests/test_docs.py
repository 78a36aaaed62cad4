"""The README and the docs site say only what runs: every code block in them is checked, and the
site builds with `mkdocs build --strict` (broken links and anchors fail it).

- `yaml`: a study file that loads through lorasweep's own loader; a block whose first line is
  `# fragment: ...` is part of one, and loads merged over a small complete study.
- `bash`: each command parses: `lorasweep ...` with the CLI's own parser, and a `run` of a study
  that ships (a built-in name, a file in the repository) also as `--dry-run`, which loads its
  model and data and trains nothing; scripts it names exist.
- `python`: compiles. `text`: output or a synopsis; a `lorasweep COMMAND` in it is a command.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lorasweep.cli import build_parser, main
from lorasweep.config import BUILTIN_STUDIES_DIR, load_study, validate_study

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
README_LINES = 250
FENCE = re.compile(r"^```(\S*)")
# Programs a block may run besides lorasweep, the repository's scripts and its venv's tools.
OUTSIDE = {"pip", "optuna-dashboard", "kubectl", "mlflow", "trackio"}
# A fragment merges over this: a complete study on the tiny test model.
BASE = {"name": "fragment", "model": {"source": "tiny:bert"},
        "task": {"kind": "classification", "dataset": "builtin:shakespeare-plays"},
        "train": {"steps": 2}, "search": {"methods": ["lora"], "ranks": [4], "lr": [1e-3]}}
# Runs whose dry run is too slow for the suite (a 135M model's load and probes), parsed only.
SLOW_DRY_RUNS = {"rl", "examples/gsm8k_smollm2_cpu.yaml"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, counted from 1
    language: str
    text: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    blocks, opened, body = [], None, []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        fence = FENCE.match(line.strip())
        if opened is None and fence:
            opened, body = (number, fence.group(1)), []
        elif opened is not None and line.strip() == "```":
            blocks.append(Block(page, opened[0], opened[1], "\n".join(body) + "\n"))
            opened = None
        elif opened is not None:
            body.append(line)
    assert opened is None, f"{page}:{opened[0]}: a code block is not closed"
    return blocks


BLOCKS = [block for page in PAGES for block in code_blocks(page)]


def of(language: str) -> list:
    return [pytest.param(b, id=str(b)) for b in BLOCKS if b.language == language]


def test_every_block_has_a_language_this_checks():
    unchecked = [f"{b} ({b.language or 'none'})" for b in BLOCKS
                 if b.language not in {"yaml", "bash", "python", "text"}]
    assert not unchecked, "give each code block yaml, bash, python or text: " + ", ".join(unchecked)


def merged(base: dict, part: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in part.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


@pytest.mark.parametrize("block", of("yaml"))
def test_a_yaml_block_is_a_study_that_loads(block: Block, tmp_path: Path):
    raw = yaml.safe_load(block.text)
    assert isinstance(raw, dict), block
    if block.text.startswith("# fragment:"):
        validate_study(merged(BASE, raw), str(block))
    else:  # as `lorasweep run` reads it, from a file
        path = tmp_path / "study.yaml"
        path.write_text(block.text)
        load_study(path)


def commands(block: Block) -> list[list[str]]:
    """Each command of a shell block as its words: lines joined at a trailing backslash,
    comments dropped, `a && b` two commands, leading VAR=value assignments and `time` off."""
    text = re.sub(r"\\\n", " ", block.text)
    found = []
    for line in text.splitlines():
        words: list[str] = []
        for word in [*shlex.split(line, comments=True), "&&"]:
            if word != "&&":
                words.append(word)
                continue
            while words and (re.fullmatch(r"[A-Z_]+=\S*", words[0])
                             or words[0] in {"time", "/usr/bin/time", "-v"}):
                words = words[1:]
            if words:
                found.append(words)
            words = []
    return found


def shipped_study(name: str) -> bool:
    return (REPO / name).is_file() or (BUILTIN_STUDIES_DIR / f"{name}.yaml").is_file()


@pytest.mark.parametrize("block", of("bash"))
def test_a_shell_block_parses(block: Block):
    for words in commands(block):
        program, args = Path(words[0]).name, words[1:]
        if program == "lorasweep":
            try:
                build_parser().parse_args(args)
            except SystemExit:
                pytest.fail(f"{block}: `{shlex.join(words)}` does not parse")
        elif program == "bash":
            assert (REPO / args[0]).is_file() and set(args[1:]) <= {"--venv-only"}, block
        elif program in {"python", "python3"}:
            script = args[1] if args[0] == "-m" else args[0]
            assert args[0] == "-m" or (REPO / script).is_file(), f"{block}: no {script}"
        elif program == "mkdocs":
            assert args[0] in {"serve", "build"}, block
        else:
            assert program in OUTSIDE, f"{block}: `{program}` is not a command the docs know"


# Each distinct `lorasweep run` of a study that ships, once however many pages show it.
DRY_RUNS = sorted({tuple(words[1:]) for block in BLOCKS if block.language == "bash"
                   for words in commands(block) if Path(words[0]).name == "lorasweep"
                   and words[1] == "run" and shipped_study(words[2])
                   and words[2] not in SLOW_DRY_RUNS})


@pytest.mark.parametrize("args", [pytest.param(a, id=" ".join(a)) for a in DRY_RUNS])
def test_a_run_in_the_docs_plans_as_a_dry_run(args: tuple[str, ...], monkeypatch, capsys):
    """Loads the study's model and data and plans its groups, training nothing."""
    monkeypatch.chdir(REPO)
    assert main([*args, "--dry-run"]) == 0
    assert "nothing was written (dry run)" in capsys.readouterr().out


@pytest.mark.parametrize("block", of("python"))
def test_a_python_block_compiles(block: Block):
    compile(block.text, str(block), "exec")


@pytest.mark.parametrize("block", of("text"))
def test_a_command_in_a_text_block_exists(block: Block, capsys):
    for line in block.text.splitlines():
        if line.startswith("lorasweep "):
            with pytest.raises(SystemExit) as done:  # its help, or a usage error
                build_parser().parse_args([line.split()[1], "--help"])
            assert done.value.code == 0, f"{block}: {line}"
    capsys.readouterr()


def test_the_readme_is_one_page_that_starts_with_the_two_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_LINES
    first = next(b for b in BLOCKS if b.page.name == "README.md")
    assert [line for line in first.text.splitlines() if not line.startswith("#")
            and line.strip()] == [
        "bash scripts/setup.sh --venv-only && .venv/bin/lorasweep run quickstart",
        "bash scripts/setup.sh && HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -n 2"]


def test_every_page_is_in_the_nav():
    nav = (REPO / "mkdocs.yml").read_text()
    for page in (REPO / "docs").rglob("*.md"):
        assert f": {page.relative_to(REPO / 'docs')}" in nav, page


def test_the_site_builds_strictly(tmp_path: Path):
    """Broken links, anchors and pages fail the build (mkdocs.yml: strict, validation)."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr
    fields = (tmp_path / "site" / "reference" / "study-file" / "index.html").read_text()
    assert "trainer.result" in fields and "lora_dropout" in fields
    help_page = (tmp_path / "site" / "reference" / "commands" / "index.html").read_text()
    assert "--dry-run" in help_page and "lorasweep curvature" in help_page


def test_the_readme_study_is_the_quickstarts(tmp_path: Path):
    block = next(b for b in BLOCKS if b.page.name == "README.md" and b.language == "yaml")
    (tmp_path / "study.yaml").write_text(block.text)
    assert load_study(tmp_path / "study.yaml") == load_study(BUILTIN_STUDIES_DIR /
                                                              "quickstart.yaml")


def test_the_quickstart_tables_are_the_scripts_output():
    """The README's and the quickstart page's table are what scripts/quickstart_table.py
    prints for the run kept in examples/results/quickstart, not numbers typed in."""
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "quickstart_table.py"),
                           str(REPO / "examples" / "results" / "quickstart")],
                          capture_output=True, text=True, check=True, timeout=60)
    table = done.stdout.strip().splitlines()[0:4]
    for page in (REPO / "README.md", REPO / "docs" / "quickstart.md"):
        assert "\n".join(table) in page.read_text(), page
