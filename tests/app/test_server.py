"""`m3d-lit app` with a port or address it cannot serve on: one line naming the option, exit 2, before
the model loads (no Gradio, no model needed here)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from m3d_lit.app.server import check_address
from m3d_lit.cli import main
from m3d_lit.errors import InputError


def _app(tmp_path: Path, capsys: pytest.CaptureFixture, *options: str) -> str:
    """The one line `m3d-lit app` ends with (the checkpoint exists, so only the options can be wrong)."""
    assert main(["app", "--checkpoint", str(tmp_path), *options]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port a program listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.parametrize("port", ["0", "65536", "70000", "-1", "http"])
def test_a_port_out_of_range_is_refused(port: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    line = _app(tmp_path, capsys, "--port", port)
    assert line == f"m3d-lit app: error: --port: {port} is not a port: give a number from 1 to 65535"


def test_a_busy_port_is_refused_with_a_free_one_named(
    busy_port: int, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    line = _app(tmp_path, capsys, "--port", str(busy_port))
    assert line.startswith(f"m3d-lit app: error: --port: {busy_port} is in use on 127.0.0.1 ")
    free = int(line.rsplit("e.g. --port ", 1)[1])
    assert busy_port < free <= busy_port + 100


def test_an_address_that_is_not_this_machines_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # 192.0.2.0/24 is reserved for documentation (RFC 5737): no machine holds it
    line = _app(tmp_path, capsys, "--host", "192.0.2.1")
    assert line.startswith("m3d-lit app: error: --host: 192.0.2.1 is not an address of this machine")


def test_a_free_port_passes(busy_port: int) -> None:
    with pytest.raises(InputError):
        check_address("127.0.0.1", busy_port)
    with socket.socket() as probe:  # a port nothing listens on: the one the system hands out
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check_address("127.0.0.1", port)
