"""The page of `m3d-lit app` (Gradio Blocks): load a scan, look at it, ask about it, download the mask.

Each browser session keeps its own `Session` (scan, predicted mask, mask file); the model is shared and
the ask event runs one at a time (`concurrency_limit=1`), so a second question waits in Gradio's queue.
"""

from __future__ import annotations

import html
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
import numpy as np

from m3d_lit.app.engine import Engine, write_mask
from m3d_lit.app.scans import PreparedScan, Scan, find_prepared, load_prepared, load_upload
from m3d_lit.app.view import OVERLAYS, PLANES, PRESETS, views_html
from m3d_lit.errors import InputError

__all__ = ["Session", "build_app", "focus"]

FALLBACK_QUESTIONS = (
    "Is there an intracranial hemorrhage?",
    "Is there a fracture?",
    "Segment the hemorrhage.",
)


@dataclass(frozen=True, eq=False)
class Session:
    """One browser session: its scan, the last predicted mask on the scan's grid and that mask's file.

    Compared and hashed by identity: Gradio hashes a session's state to see whether an event changed it.
    """

    scan: Scan | None = None
    predicted: np.ndarray | None = None
    mask_file: Path | None = None


def _drop_mask_file(session: Session | None) -> None:
    if session is not None and session.mask_file is not None:
        shutil.rmtree(session.mask_file.parent, ignore_errors=True)


def focus(mask: np.ndarray | None, shape: tuple[int, ...]) -> dict[str, int]:
    """Slice per plane through the most voxels of `mask`, or the middle slices without one."""
    if mask is None or not mask.any():
        return {name: n // 2 for name, n in zip(PLANES, shape)}
    sums = {name: mask.sum(axis=tuple(a for a in range(3) if a != axis)) for axis, name in enumerate(PLANES)}
    return {name: int(np.argmax(values)) for name, values in sums.items()}


def _slider_updates(shape: tuple[int, ...], at: dict[str, int]) -> list[dict]:
    return [gr.update(maximum=n - 1, value=at[name]) for name, n in zip(PLANES, shape)]


def _reference_table(scan: Scan) -> str:
    if not scan.questions:
        return "Uploaded scan: no reference answers."
    rows = ["| kind | question | reference answer |", "| --- | --- | --- |"]
    for line in scan.questions:
        cells = (html.escape(text).replace("|", "\\|") for text in (line.kind, line.question, line.answer))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _discard(upload: Path) -> None:
    """Remove an uploaded copy once read (the arrays are in memory), and its folder once empty."""
    upload.unlink(missing_ok=True)
    try:
        upload.parent.rmdir()
    except OSError:  # another upload of the same content still lies there, or it is gone already
        pass


def _error(err: InputError) -> str:
    """The command line's one-line message, in the page."""
    return f"<p class='m3d-error-line'>Error: {html.escape(str(err))}</p>"


def _fmt_p(p_yes: float | None) -> str:
    return "" if p_yes is None else f"{p_yes:.3f}"


class App:
    """The page's callbacks around one `Engine`, the prepared scans and the app's temporary folder."""

    def __init__(self, engine: Engine, data: list[Path], workdir: Path) -> None:
        self.engine, self.workdir = engine, workdir
        self.prepared: dict[str, PreparedScan] = find_prepared(data) if data else {}
        questions = [q.question for entry in self.prepared.values() for q in entry.questions]
        self.questions = list(dict.fromkeys(questions)) or list(FALLBACK_QUESTIONS)

    def _loaded(self, session: Session, scan: Scan) -> list:
        _drop_mask_file(session)
        at = focus(scan.reference, scan.display.shape)
        choices = list(dict.fromkeys(q.question for q in scan.questions)) or self.questions
        return [
            Session(scan),
            "",
            _reference_table(scan),
            gr.update(choices=choices, value=None),
            gr.update(interactive=scan.hu),
            None,
            *_slider_updates(scan.display.shape, at),
        ]

    def pick(self, key: str | None, session: Session) -> list:
        if not key:
            return [session, "", *[gr.skip()] * 7]
        try:
            scan = load_prepared(key, self.prepared[key], self.engine.size)
        except InputError as err:
            return [session, _error(err), *[gr.skip()] * 7]
        return self._loaded(session, scan)

    def upload(self, path: str | None, session: Session) -> list:
        """Outputs as `pick`, then None to empty the upload box (its file is gone by then)."""
        if not path:
            return [session, "", *[gr.skip()] * 7, None]
        upload = Path(path)
        try:
            scan = load_upload(upload, upload.name, self.engine.size, self.engine.window, self.workdir)
        except InputError as err:
            return [session, _error(err), *[gr.skip()] * 7, None]
        finally:
            _discard(upload)
        return [*self._loaded(session, scan), None]

    def render(self, session: Session, axial, coronal, sagittal, preset: str, shown: list[str]) -> str:
        indices = {"axial": axial, "coronal": coronal, "sagittal": sagittal}
        return views_html(session.scan, indices, preset, {k: k in shown for k in OVERLAYS}, session.predicted)

    def _mask_file(self, scan: Scan, seg_logits) -> Path:
        folder = self.workdir / "masks" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        path = folder / f"{Path(scan.name).name.split('.')[0]}_mask.nii.gz"
        write_mask(path, seg_logits, scan.geometry)
        return path

    def ask(self, session: Session, question: str, blank: bool, preset: str, shown: list[str]):
        """Generator: the answer as it grows, then the mask and views, then the blank-volume answer."""
        out = {"answer": "", "p_yes": "", "blank": "", "blank_p_yes": "", "status": ""}
        if session.scan is None:
            yield {**out, "status": "Load a scan first."}
            return
        start = time.perf_counter()
        yield {**out, "status": "Answering..."}
        try:
            for part in self.engine.stream(session.scan.image, question):
                out.update(answer=part.text, p_yes=_fmt_p(part.p_yes))
                yield dict(out)
        except InputError as err:
            yield {**out, "status": _error(err)}
            return
        _drop_mask_file(session)
        if part.seg_logits is None:
            session = replace(session, predicted=None, mask_file=None)
        else:
            predicted = (part.seg_logits.float().sigmoid() > 0.5).cpu().numpy().astype(np.uint8)[0]
            session = replace(
                session, predicted=predicted, mask_file=self._mask_file(session.scan, part.seg_logits)
            )
        if session.predicted is None:  # the slices stay where the reader left them
            yield {**out, "session": session, "mask": None}
        else:
            at = focus(session.predicted, session.scan.display.shape)
            views = views_html(session.scan, at, preset, {k: k in shown for k in OVERLAYS}, session.predicted)
            yield {**out, "session": session, "views": views, "at": at, "mask": str(session.mask_file)}
        if blank:
            for part in self.engine.stream(np.zeros_like(session.scan.image), question):
                out.update(blank=part.text, blank_p_yes=_fmt_p(part.p_yes))
                yield dict(out)
        seg = "" if session.predicted is None else f"; predicted mask: {int(session.predicted.sum())} voxels"
        yield {**out, "status": f"Answered in {time.perf_counter() - start:.1f} s{seg}."}


def _scan_panel(app: App) -> dict:
    pick = gr.Dropdown(sorted(app.prepared), value=None, label="Prepared test scan", elem_id="m3d-prepared")
    upload = gr.File(label="...or upload a NIfTI, a .zip of a DICOM series or an .npy",
                     file_types=[".nii", ".gz", ".npy", ".zip"], type="filepath", elem_id="m3d-upload")  # fmt: skip
    return {"pick": pick, "upload": upload, "error": gr.HTML(elem_id="m3d-error"),
            "reference": gr.Markdown(elem_id="m3d-reference")}  # fmt: skip


def _view_panel() -> dict:
    views = gr.HTML(views_html(None, {}, "brain", {}, None), elem_id="m3d-views")
    sliders = [gr.Slider(0, 1, value=0, step=1, label=f"{name} slice", elem_id=f"m3d-{name}-slider")
               for name in PLANES]  # fmt: skip
    with gr.Row():
        preset = gr.Radio(list(PRESETS), value="brain", label="Window", elem_id="m3d-window")
        shown = gr.CheckboxGroup(
            list(OVERLAYS), value=list(OVERLAYS), label="Masks shown", elem_id="m3d-overlays"
        )
    return {"views": views, "sliders": sliders, "preset": preset, "shown": shown}


def _ask_panel(app: App) -> dict:
    with gr.Row():
        known = gr.Dropdown(
            app.questions, value=None, label="One of the dataset's questions", elem_id="m3d-known"
        )
        question = gr.Textbox(label="Question", elem_id="m3d-question", scale=2)
        blank = gr.Checkbox(label="Also without the image (blank volume)", elem_id="m3d-blank")
        ask = gr.Button("Ask", variant="primary", elem_id="m3d-ask")
    with gr.Row():
        labels = {"answer": ("Answer (with the scan)", "m3d-answer"),
                  "p_yes": ("P(Yes) vs No, first token", "m3d-pyes"),
                  "blank": ("Answer (blank volume)", "m3d-answer-blank"),
                  "blank_p_yes": ("P(Yes), blank volume", "m3d-pyes-blank")}  # fmt: skip
        out = {k: gr.Textbox(label=text, elem_id=eid, interactive=False) for k, (text, eid) in labels.items()}
    out["status"] = gr.Markdown(elem_id="m3d-status")
    out["mask"] = gr.File(label="Predicted mask (NIfTI)", elem_id="m3d-mask", interactive=False)
    return {**out, "known": known, "question": question, "blank_switch": blank, "ask": ask}


def _wire(app: App, c: dict) -> None:
    """The events: loading a scan, redrawing the views, asking (one at a time over all sessions)."""
    sliders = c["sliders"]
    loaded = [c["session"], c["error"], c["reference"], c["known"], c["preset"], c["mask"], *sliders]
    # answers about the previous scan must not stand beside a new one
    answers = [c[k] for k in ("answer", "p_yes", "blank", "blank_p_yes", "status")]
    c["pick"].change(app.pick, [c["pick"], c["session"]], loaded, concurrency_limit=None).then(
        lambda: [""] * len(answers), None, answers
    )
    upload = c["upload"]
    upload.upload(app.upload, [upload, c["session"]], [*loaded, upload], concurrency_limit=2).then(
        lambda: [""] * len(answers), None, answers
    )
    c["known"].change(lambda q: q or gr.skip(), c["known"], c["question"])
    view_inputs = [c["session"], *sliders, c["preset"], c["shown"]]
    for trigger in (*sliders, c["preset"], c["shown"], c["session"]):
        trigger.change(app.render, view_inputs, c["views"], concurrency_limit=None, show_progress="hidden")

    def run(session, text, without, window, overlays):
        for out in app.ask(session, text, without, window, overlays):
            at = out.pop("at", None)
            update = {c[k]: v for k, v in out.items()}
            if at is not None:
                update.update({s: gr.update(value=at[n]) for s, n in zip(sliders, PLANES)})
            yield update

    outputs = [*answers, c["session"], c["views"], c["mask"], *sliders]
    inputs = [c["session"], c["question"], c["blank_switch"], c["preset"], c["shown"]]
    for trigger in (c["ask"].click, c["question"].submit):
        trigger(run, inputs, outputs, concurrency_limit=1, concurrency_id="model")


def build_app(engine: Engine, data: list[Path], workdir: Path) -> gr.Blocks:
    """The Blocks of the page; `workdir` holds unpacked zips and mask files."""
    app = App(engine, data, workdir)
    with gr.Blocks(title="m3d-lit", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        session = gr.State(Session(), delete_callback=_drop_mask_file)
        gr.Markdown("## m3d-lit: look at a scan, ask about it, see the mask")
        with gr.Row():
            with gr.Column(scale=1):
                scan = _scan_panel(app)
            with gr.Column(scale=3):
                view = _view_panel()
        _wire(app, {"session": session, **scan, **view, **_ask_panel(app)})
    return page
