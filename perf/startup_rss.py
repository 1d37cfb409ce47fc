"""Start-up memory of `m3d-lit fit` with a local LLM: peak RSS above the same run without it.

.venv/bin/python perf/startup_rss.py                 # a ~600 MB fp32 Llama, bf16-true, max_steps 0
.venv/bin/python perf/startup_rss.py --llm-mb 200    # smaller and faster
git worktree add /tmp/base <commit> && .venv/bin/python perf/startup_rss.py --baseline-src /tmp/base/src
                                                     # the same measurement of another checkout, side by side

It writes a random fp32 Llama directory (safetensors + the built-in tokenizer) of about `--llm-mb`, a
few synthetic prepared CQ500 scans, then runs `m3d-lit fit -c stage3 -c cpu --model.preset tiny
--trainer.precision bf16-true --trainer.max_steps 0` twice, each in its own process: with
`--model.llm_path` that directory and without it (the tiny preset's random LLM). The peak resident set
size of each process (its own `VmHWM`, polled until it ends) is read, and the extra peak of the first run is given
as a multiple of the LLM's bytes in bf16, the dtype it is trained in. 1.0 means the LLM was held once,
in bf16, at every moment; loading it at its checkpoint dtype and casting later gives ~3 (fp32 copy + bf16
copy + the file's mapped pages). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_llm(folder: Path, megabytes: float) -> int:
    """A random fp32 Llama of about `megabytes` (hidden 1024) with the built-in tokenizer; its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from m3d_lit.models.tokenizer import build_llm_tokenizer

    tokenizer = build_llm_tokenizer(None)
    hidden, inter = 1024, 2816
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    embeddings = 2 * len(tokenizer) * hidden
    layers = max(1, round((megabytes * 2**20 / 4 - embeddings) / per_layer))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def prepare(root: Path) -> Path:
    """Four synthetic CQ500 scans prepared at the tiny preset's size."""
    m3d = [sys.executable, "-m", "m3d_lit.cli"]
    subprocess.run(
        [*m3d, "synth", "--out", str(root / "raw"), "--cq500", "4", "--physionet", "0"], check=True
    )
    out = root / "cq500"
    prepare_argv = ["prepare", "cq500", "--root", str(root / "raw" / "cq500"), "--out", str(out)]
    subprocess.run([*m3d, *prepare_argv, "--size", "32", "64", "64", "--fractions", "0.5", "0.25", "0.25"],
                   check=True)  # fmt: skip
    return out


def _high_water_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    line = next((x for x in status.splitlines() if x.startswith("VmHWM:")), None)
    return None if line is None else int(line.split()[1]) / 1024


def peak_rss_mb(argv: list[str], cwd: Path, src: Path | None = None) -> float:
    """Peak RSS (MiB) of one `m3d-lit` process, which must succeed: its own high-water mark (`VmHWM`),
    read until it ends, so DataLoader workers or other children are not counted."""
    env = {**os.environ, "PYTHONPATH": str(src)} if src else None
    command = [sys.executable, "-m", "m3d_lit.cli", *argv]
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, env=env)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, _high_water_mb(process.pid) or 0.0)
        time.sleep(0.02)
    if process.returncode != 0:
        raise SystemExit(f"m3d-lit {' '.join(argv)} failed (exit {process.returncode})")
    return peak


def measure(fit: list[str], llm: Path, root: Path, src: Path | None, bf16_mb: float) -> dict:
    """Peak RSS without and with `--model.llm_path` for the m3d-lit under `src` (None: this one)."""
    without = peak_rss_mb(fit, root, src)
    with_llm = peak_rss_mb([*fit, "--model.llm_path", str(llm)], root, src)
    return {
        "src": str(src or Path(__file__).resolve().parents[1] / "src"),
        "peak_rss_mb_without_llm_path": round(without, 1),
        "peak_rss_mb_with_llm_path": round(with_llm, 1),
        "extra_peak_over_llm_bf16": round((with_llm - without) / bf16_mb, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm-mb", type=float, default=600.0, help="size of the fp32 LLM directory")
    parser.add_argument("--precision", default="bf16-true", help="trainer precision of both runs")
    parser.add_argument("--baseline-src", type=Path, help="another checkout's src/, measured the same way")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params = write_llm(root / "llm", args.llm_mb)
        data = prepare(root)
        fit = [
            "fit", "-c", "stage3", "-c", "cpu", "--model.preset", "tiny", "--model.init_from", "null",
            "--data.roots", json.dumps([str(data)]), "--data.batch_size", "2",
            "--trainer.precision", args.precision, "--trainer.max_steps", "0", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
        ]  # fmt: skip
        bf16_mb = params * 2 / 2**20
        runs = [measure(fit, root / "llm", root, None, bf16_mb)]
        if args.baseline_src:
            runs.append(measure(fit, root / "llm", root, args.baseline_src.resolve(), bf16_mb))
    print(
        f"LLM {params / 1e6:.1f}M parameters ({params * 4 / 2**20:.1f} MB fp32 on disk, {bf16_mb:.1f} MB bf16), "
        f"precision {args.precision}"
    )
    for run in runs:
        print(
            f"  {run['src']}: peak RSS without llm_path {run['peak_rss_mb_without_llm_path']:.0f} MB, with "
            f"{run['peak_rss_mb_with_llm_path']:.0f} MB: extra = {run['extra_peak_over_llm_bf16']}x the LLM's bf16 bytes"
        )
    result = {
        "llm_parameters": params,
        "llm_bf16_mb": round(bf16_mb, 1),
        "precision": args.precision,
        "runs": runs,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
