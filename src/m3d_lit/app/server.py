"""Serving the app's page: the model loaded once, the page built and served until interrupted.

`m3d-lit app` (`m3d_lit.commands.app`) checks the options, prepares the environment and calls `serve`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["serve"]


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
