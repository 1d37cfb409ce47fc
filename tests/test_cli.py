"""The `m3d-lit` command itself: no command, --version, a closed pipe, the recipes list."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from m3d_lit.cli import main


def test_no_command_is_a_mistake(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(
        "m3d-lit: a command is needed\n\nusage: m3d-lit COMMAND"
    )


def test_version(capsys: pytest.CaptureFixture) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("m3d-lit ")


def test_a_reader_that_closed_the_pipe_gets_no_traceback() -> None:
    """`m3d-lit -h | head`: head gone before m3d-lit writes; the pipe's read end is closed first."""
    read, write = os.pipe()
    os.close(read)
    code = "import sys; from m3d_lit.cli import entry; sys.exit(entry())"
    done = subprocess.run(
        [sys.executable, "-c", code, "-h"], stdout=write, stderr=subprocess.PIPE, timeout=120
    )
    os.close(write)
    assert done.returncode == 0 and done.stderr == b"", done.stderr.decode()


def test_recipes_say_what_each_is_for(capsys: pytest.CaptureFixture) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "  fsdp          FSDP2 on GPUs: every GPU holds a shard of the weights" in out
    assert "  cq500_qa         CQ500 brain-CT QA from `m3d-lit prepare cq500" in out
    assert main(["recipes", "--paths"]) == 0
    assert "recipes/stages/trainer/fsdp.yaml" in capsys.readouterr().out
