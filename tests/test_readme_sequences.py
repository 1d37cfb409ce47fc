"""The README's "Your own scans" commands, run exactly as printed, one after the other, in an empty folder:
what a new user copies must work from wherever they stand, and write everything under that folder."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest import REPO

from m3d_lit.cli import main

README = REPO / "README.md"


def readme_commands(section: str) -> list[list[str]]:
    """The `m3d-lit` commands of the first bash block under the heading `## <section>`, as argv lists."""
    text = README.read_text(encoding="utf-8")
    body = text[text.index(f"## {section}\n") :]
    block = body[body.index("```bash\n") + len("```bash\n") :]
    block = block[: block.index("```")].replace("\\\n", " ")
    lines = [line.split(" #")[0].strip() for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("m3d-lit ")]


@pytest.mark.slow
def test_your_own_scans_runs_as_printed_from_an_empty_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands = readme_commands("Your own scans")
    assert [c[0] for c in commands] == ["synth", "prepare", "fit", "eval"]
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        assert main(argv) == 0, argv
    outside = {p.name for p in tmp_path.iterdir()}
    assert outside <= {"example", "data", "runs", "eval"}, outside  # everything under the working folder
    metrics = json.loads((tmp_path / "eval" / "folder" / "metrics.json").read_text())
    assert metrics["n"] > 0 and (tmp_path / "eval" / "folder" / "report.md").is_file()
