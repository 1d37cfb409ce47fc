"""Serving the app's page: the model loaded once, the page built and served until interrupted.

`m3d-lit app` (`m3d_lit.commands.app`) checks the options, prepares the environment and calls `serve`.
"""

from __future__ import annotations

import argparse
import errno
import socket
import time
from pathlib import Path

from m3d_lit.errors import InputError

__all__ = ["check_address", "serve"]

PORTS = (1, 65535)


def _bind(host: str, port: int) -> None:
    """Bind `host:port` as the page's server will (address reuse on, so a port a stopped app left in
    TIME_WAIT is free), and let it go: raises the `OSError` the server would meet."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def _free_port_after(host: str, port: int) -> int | None:
    for candidate in range(port + 1, min(port + 100, PORTS[1]) + 1):
        try:
            _bind(host, candidate)
        except OSError:
            continue
        return candidate
    return None


def check_address(host: str, port: int) -> None:
    """Refuse, in one line naming the option, a `--host`/`--port` the page cannot be served on: a port
    another program holds, one this user may not open, an address that is not this machine's."""
    try:
        _bind(host, port)
    except socket.gaierror as err:
        raise InputError("--host", f"{host}: not an address this machine knows ({err.strerror})") from None
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            free = _free_port_after(host, port)
            instead = f"e.g. --port {free}" if free else "or stop the program that holds it"
            problem = f"{port} is in use on {host} (another app or program listens there): choose another, "
            problem += instead
            raise InputError("--port", problem) from None
        if err.errno == errno.EACCES and port < 1024:
            problem = f"{port}: only an administrator may open a port below 1024; choose one from 1024 to "
            problem += str(PORTS[1])
            raise InputError("--port", problem) from None
        if err.errno == errno.EADDRNOTAVAIL:
            problem = f"{host} is not an address of this machine (127.0.0.1 serves this machine only)"
            raise InputError("--host", problem) from None
        raise InputError("--port", f"cannot serve on {host}:{port}: {err.strerror}") from None


def serve(args: argparse.Namespace, workdir: Path) -> None:
    """Load the model, build the page and serve it until interrupted."""
    # imported here, not at the top: Gradio and huggingface_hub (which the engine's transformers loads)
    # read their settings (analytics, telemetry, temporary folder) from the environment when first
    # imported, and `m3d-lit app` sets them just before calling this
    import gradio as gr

    from m3d_lit.app.engine import Engine
    from m3d_lit.app.ui import build_app

    start = time.perf_counter()
    engine = Engine(args.checkpoint, args.device, args.max_new_tokens, args.dtype, args.source)
    page = build_app(engine, list(args.data), workdir)
    page.queue(default_concurrency_limit=1)
    try:
        page.launch(
            server_name=args.host,
            server_port=args.port,
            share=False,
            inbrowser=False,
            prevent_thread_lock=True,
            quiet=True,
            theme=gr.themes.Default(),
            footer_links=[],
        )
    except OSError:  # taken while the model loaded: Gradio says only that it found no empty port
        check_address(args.host, args.port)
        raise
    print(
        f"m3d-lit app: serving {args.checkpoint} on http://{args.host}:{args.port} "
        f"(ready in {time.perf_counter() - start:.1f} s; Ctrl-C stops it)",
        flush=True,
    )
    try:
        while True:
            time.sleep(0.5)
    finally:
        page.close()
