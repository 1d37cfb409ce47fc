"""Run every CPU benchmark, write `perf/results.json` and a readable `perf/results.md` (`make perf`).

.venv/bin/python perf/run_all.py [--quick]

Each benchmark runs in its own process (its last stdout line is JSON; `prepare.py` prints text lines,
parsed here); one that fails or times out is recorded with its error and the others still run.
Sized to finish in under 10 minutes on 2 CPU cores; `--quick` shrinks every benchmark (a smoke run).
`perf/gpu_fit.py` needs a GPU and is not run here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

PERF = Path(__file__).resolve().parent
_PREPARE_LINE = re.compile(r"prepare (\w+): (\d+) scans .*workers=(\d+): ([\d.]+) s, ([\d.]+) scans/s")


def commands(quick: bool) -> dict[str, list[str]]:
    """The benchmark command lines (arguments after the script)."""
    py = [sys.executable]
    if quick:
        return {
            "plan": [*py, "-m", "m3d_lit.commands.plan", "--json", "--micro-batch", "2"],
            "train_step": [*py, str(PERF / "train_step.py"), "--presets", "tiny", "--stages", "3", "--steps", "1"],
            "generate": [*py, str(PERF / "generate.py"), "--batches", "1", "8", "--new-tokens", "8", "--repeats", "1"],
            "loader": [*py, str(PERF / "loader.py"), "--samples", "4", "--otf-samples", "4", "--workers", "0"],
            "stream_loader": [*py, str(PERF / "stream_loader.py"), "--samples", "8", "--size", "16", "64", "64",
                              "--repeats", "1"],
            "prepare": [*py, str(PERF / "prepare.py"), "--scans", "2", "--shape", "16", "64", "64",
                        "--size", "16", "64", "64", "--workers", "1"],
            "fit_overhead": [*py, str(PERF / "train_step.py"), "--fit", "--steps", "2", "--batch", "2",
                             "--rounds", "1"],
            "padding": [*py, str(PERF / "padding.py"), "--samples", "192"],
        }  # fmt: skip
    return {
        "plan": [*py, "-m", "m3d_lit.commands.plan", "--json", "--micro-batch", "2"],
        "train_step": [*py, str(PERF / "train_step.py"), "--presets", "tiny", "small", "--steps", "2"],
        "generate": [*py, str(PERF / "generate.py")],
        "loader": [*py, str(PERF / "loader.py"), "--samples", "16", "--otf-samples", "8"],
        "stream_loader": [*py, str(PERF / "stream_loader.py"), "--samples", "48", "--workers", "2"],
        "prepare": [*py, str(PERF / "prepare.py"), "--scans", "4", "--workers", "1", "2"],
        "fit_overhead": [
            *py,
            str(PERF / "train_step.py"),
            "--fit",
            "--steps",
            "8",
            "--batch",
            "8",
            "--rounds",
            "2",
        ],
        "padding": [*py, str(PERF / "padding.py")],
    }


def run(name: str, cmd: list[str], timeout: float) -> dict[str, Any]:
    """One benchmark's result (its JSON or parsed lines), seconds, or the error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "seconds": timeout}
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:], "seconds": seconds}
    lines = done.stdout.strip().splitlines()
    if name == "prepare":
        rows = [m.groups() for m in map(_PREPARE_LINE.search, lines) if m]
        keys = ("dataset", "scans", "workers", "seconds", "scans_per_s")
        result: Any = [dict(zip(keys, (d, int(n), int(w), float(s), float(r)))) for d, n, w, s, r in rows]
    elif name == "plan":
        result = json.loads(done.stdout)
    else:
        result = json.loads(lines[-1])[{"fit_overhead": "train_step"}.get(name, name)]
    return {"result": result, "seconds": seconds}


def table(results: dict[str, Any]) -> str:
    """Markdown tables of the figures that matter."""
    out = ["# m3d-lit CPU benchmarks", "", f"{results['machine']}", ""]
    get = {k: v.get("result") for k, v in results["benchmarks"].items()}
    errors = [f"- {k}: {v['error']}" for k, v in results["benchmarks"].items() if "error" in v]
    if get.get("plan"):
        p = get["plan"]
        out += ["## plan (paper, stage 3, 24 GB)", "", "| part | GiB |", "| --- | --- |"]
        out += [f"| {k} | {v:.2f} |" for k, v in p["memory_gib"].items()]
        out += [f"| **total, micro-batch {p['settings']['micro_batch']}** | **{p['total_gib']:.2f}** "
                f"({'fits' if p['fits'] else 'does not fit'}) |", ""]  # fmt: skip
    if get.get("train_step"):
        out += ["## train_step (CPU fp32)", "", "| preset | stage | steps/s | samples/s | peak RSS MiB |"]
        out += ["| --- | --- | --- | --- | --- |"]
        out += [f"| {r['preset']} | {r['stage']} | {r['steps_per_s']:.3f} | {r['samples_per_s']:.3f} | "
                f"{r['peak_rss_mib']:.0f} |" for r in get["train_step"]]  # fmt: skip
        out.append("")
    if get.get("generate"):
        out += ["## generate (tiny, fp32 CPU)", "", "| batch | tokens/s | decode tokens/s | x batch 1 |"]
        out += ["| --- | --- | --- | --- |"]
        out += [f"| {r['batch']} | {r['tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | "
                f"{r['speedup_vs_1']:.2f} |" for r in get["generate"]["rows"]]  # fmt: skip
        out.append("")
    if get.get("loader"):
        out += ["## loader (32x256x256)", "", "| source | workers | samples/s |", "| --- | --- | --- |"]
        out += [
            f"| {r['source']} | {r['workers']} | {r['samples_per_s']:.2f} |" for r in get["loader"]["rows"]
        ]
        out += ["", f"cached float16 / on-the-fly: x{get['loader']['cached_over_on_the_fly']:.1f}", ""]
    if get.get("stream_loader"):
        r = get["stream_loader"]
        shape = "x".join(map(str, r["size"]))
        out += [f"## stream_loader (1x{shape} float16, 1 rank, {r['workers']} workers)", "",
                "| loader | samples/s | MiB/sample |", "| --- | --- | --- |"]  # fmt: skip
        out += [f"| {n} | {r['samples_per_s'][n]:.2f} | {r['bytes_per_sample'][n] / 2**20:.3f} |"
                for n in ("stream", "files")]  # fmt: skip
    if get.get("fit_overhead"):
        f = get["fit_overhead"]
        out += ["## m3d-lit fit against the bare step (stage 3, tiny, CPU)", "",
                f"fit / bare: {f['fit_over_bare_cpu']:.3f} in CPU time, {f['fit_over_bare_wall']:.3f} in wall "
                f"time ({f['fit_cpu_s']:.3f} / {f['bare_cpu_s']:.3f} CPU s per step)", ""]  # fmt: skip
    if get.get("padding"):
        out += ["## padding (Cap + VQA mix)", "", "| sampler | LLM tokens computed per real token |"]
        out += ["| --- | --- |"]
        out += [f"| {'grouped by length' if r['grouped'] else 'plain'} | {r['computed_per_real']:.2f} |"
                for r in get["padding"]]  # fmt: skip
        out.append("")
    if get.get("prepare"):
        out += ["## prepare", "", "| dataset | workers | scans/s |", "| --- | --- | --- |"]
        out += [f"| {r['dataset']} | {r['workers']} | {r['scans_per_s']:.2f} |" for r in get["prepare"]]
        out.append("")
    return "\n".join(out + (["## errors", *errors] if errors else []))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smallest sizes: checks the scripts run")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per benchmark")
    ap.add_argument("--out", type=Path, default=PERF, help="folder for results.json and results.md")
    args = ap.parse_args(argv)
    machine = f"{platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__}, load {os.getloadavg()}"
    results: dict[str, Any] = {"machine": machine, "quick": args.quick, "benchmarks": {}}
    for name, cmd in commands(args.quick).items():
        print(f"bench {name} ...", flush=True)
        results["benchmarks"][name] = entry = run(name, cmd, args.timeout)
        print(f"  {'error: ' + str(entry['error']) if 'error' in entry else 'ok'} ({entry['seconds']:.0f} s)")
    results["load_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    _write(args.out / "results.json", json.dumps(results, indent=2) + "\n")
    text = table(results)
    _write(args.out / "results.md", text + "\n")
    print(text)
    return 1 if any("error" in e for e in results["benchmarks"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
