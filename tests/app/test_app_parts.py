"""The parts of `m3d-lit app` without a browser: P(Yes), streaming, the model queue, uploads and views."""

from __future__ import annotations

import json
import re
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from m3d_lit.app.engine import Engine, is_closed_question
from m3d_lit.app.scans import Scan, load_upload
from m3d_lit.app.view import plane, views_html
from m3d_lit.errors import InputError
from m3d_lit.inference.predictor import yes_probability

SIZE = (32, 64, 64)


def test_yes_probability_is_a_softmax_over_the_two_logits() -> None:
    logits = torch.tensor([5.0, 1.5, -0.5, 9.0])  # ids 1 (Yes) and 2 (No); the others must not count
    expected = 1.0 / (1.0 + np.exp(-0.5 - 1.5))
    assert yes_probability(logits, 1, 2) == pytest.approx(expected, rel=1e-12)
    assert yes_probability(logits, 2, 1) == pytest.approx(1.0 - expected, rel=1e-12)
    assert yes_probability(torch.tensor([3.0, 3.0]), 0, 1) == 0.5


@pytest.mark.parametrize(
    ("question", "closed"),
    [("Is there a fracture?", True), ("  does it bleed?", True), ("Segment the hemorrhage.", False),
     ("Island of Reil: what is it?", False), ("What type of hemorrhage is there?", False)],
)  # fmt: skip
def test_closed_questions_by_their_first_word(question: str, closed: bool) -> None:
    assert is_closed_question(question) is closed


def test_bad_uploads_are_one_line_errors_naming_the_upload(tmp_path: Path) -> None:
    cases = {
        "scan.nii.gz": b"\x1f\x8b truncated",
        "scan.zip": b"not a zip",
        "scan.npy": b"\x93NUMPY garbage",
        "scan.txt": b"hello",
    }
    for name, data in cases.items():
        path = tmp_path / "upload-7f3a" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        with pytest.raises(InputError) as err:
            load_upload(path, name, SIZE, "brain", tmp_path)
        message = str(err.value)
        assert message.startswith(f"{name}: ") and "\n" not in message and "upload-7f3a" not in message


def test_npy_upload_is_resized_and_shown_as_it_is(tmp_path: Path) -> None:
    volume = np.random.default_rng(0).random((1, 16, 32, 32)).astype(np.float32)
    np.save(tmp_path / "vol.npy", volume)
    scan = load_upload(tmp_path / "vol.npy", "vol.npy", SIZE, "brain", tmp_path)
    assert scan.image.shape == (1, *SIZE) and not scan.hu and scan.extent_mm is None
    np.testing.assert_array_equal(scan.display, scan.image[0])
    assert 0.0 <= scan.image.min() and scan.image.max() <= 1.0  # trilinear resizing stays within the range


def test_zip_members_outside_the_archive_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("../outside.dcm", b"x")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(InputError, match="points outside the archive"):
        load_upload(path, "evil.zip", SIZE, "brain", work)
    assert not (tmp_path / "outside.dcm").exists() and list(work.iterdir()) == []


@pytest.mark.slow
def test_zip_of_a_dicom_series_is_read_as_the_command_line_reads_the_folder(
    synthetic_raw: Path, tmp_path: Path
) -> None:
    from m3d_lit.data.preprocess import load_and_preprocess

    series = sorted(p.parent for p in (synthetic_raw / "cq500").rglob("CT000000.dcm"))[0]
    path = tmp_path / "series.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(series.iterdir()):
            archive.write(file, f"study/{file.name}")
    work = tmp_path / "work"
    work.mkdir()
    scan = load_upload(path, "series.zip", SIZE, "brain", work)
    assert scan.hu and scan.display.shape == SIZE and scan.extent_mm is not None
    np.testing.assert_array_equal(scan.image, load_and_preprocess(series, size=SIZE, window="brain").image)
    assert list(work.iterdir()) == []  # the unpacked series is gone once read


def test_views_put_the_mask_on_the_slice_shown() -> None:
    display = np.linspace(0.0, 1.0, np.prod(SIZE), dtype=np.float32).reshape(SIZE)
    reference = np.zeros(SIZE, np.uint8)
    reference[10, 20:30, 20:30] = 1
    scan = Scan("x", display[None], display, False, reference=reference)
    at = {"axial": 10, "coronal": 25, "sagittal": 25}

    def axial(index: int, overlay: bool) -> str:
        page = views_html(scan, {**at, "axial": index}, "brain", {"reference": overlay}, None)
        return re.search(r"id='m3d-axial' alt='[^']*' src='([^']+)'", page).group(1)

    assert axial(10, True) != axial(10, False)
    assert axial(11, True) == axial(11, False)  # no mask on that slice
    # coronal and sagittal put the top of the head (the last axial slice) in the first row
    assert plane(display, "coronal", 5)[0, 0] == display[-1, 5, 0]


@pytest.fixture(scope="module")
def engine(stage3_checkpoint: Path) -> Engine:
    return Engine(stage3_checkpoint, max_new_tokens=8)


@pytest.mark.slow
def test_stream_grows_to_the_command_line_answer(
    engine: Engine, stage3_checkpoint: Path, prepared: list[Path]
):
    from m3d_lit.commands.ask import ask
    from m3d_lit.inference.predictor import Predictor

    predictor = Predictor.load(stage3_checkpoint, max_new_tokens=8)
    volume = sorted((prepared[1] / "images").glob("*.npy"))[0]
    for question in ("Is there a fracture?", "Segment the hemorrhage."):
        answer = ask(predictor, volume, question)
        parts = list(engine.stream(answer.prepared.image, question))
        assert parts[-1].done and parts[-1].text == answer.prediction.text
        assert parts[-1].p_yes == answer.prediction.p_yes  # the same Predictor answers both
        assert (parts[-1].seg_logits is None) == (answer.prediction.seg_logits is None)
        assert all(not p.done for p in parts[:-1]) and len(parts) >= 2
        assert all((p.p_yes is not None) == is_closed_question(question) for p in parts)


@pytest.mark.slow
def test_second_question_waits_for_the_first(engine: Engine, prepared: list[Path]) -> None:
    from m3d_lit.data.datasets import load_prepared_volume as load_volume

    image = load_volume(sorted((prepared[0] / "images").glob("*.npy"))[0]).numpy()
    running, most, lock = [0], [0], threading.Lock()
    generate = engine.model.generate

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return generate(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    engine.model.generate = counted
    try:
        answers: list[str] = []
        threads = [threading.Thread(target=lambda: answers.append(engine.answer(image, "Is there a fracture?").text))
                   for _ in range(3)]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    finally:
        del engine.model.generate
    assert most[0] == 1 and len(answers) == 3 and len(set(answers)) == 1


def test_app_command_refuses_a_missing_checkpoint_in_one_line(tmp_path: Path, capsys) -> None:
    from m3d_lit.cli import main

    assert main(["app", "--checkpoint", str(tmp_path / "none.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"m3d-lit app: error: {tmp_path / 'none.ckpt'}: does not exist"
    )
    (tmp_path / "x.ckpt").write_bytes(b"")
    assert main(["app", "--checkpoint", str(tmp_path / "x.ckpt"), "--data", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.slow
def test_two_sessions_asking_at_once_are_both_answered_in_turn(
    engine: Engine, prepared: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the page's server (its queue, then the engine's lock): the second question waits, not dropped."""
    import socket
    import time

    from gradio_client import Client

    from m3d_lit.app.ui import build_app

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    generate, running, most, lock = engine.model.generate, [0], [0], threading.Lock()

    def slow(*args, **kwargs):  # long enough that the two questions surely meet
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(1.0)
        try:
            return generate(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(engine.model, "generate", slow)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    page = build_app(engine, [prepared[1]], tmp_path)
    page.queue(default_concurrency_limit=1)
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        clients = [Client(f"http://127.0.0.1:{port}/", verbose=False) for _ in range(2)]
        first = json.loads((prepared[1] / "qa_test.jsonl").read_text().splitlines()[0])
        key = f"{prepared[1].name}/{Path(first['image']).stem}"
        for client in clients:
            client.predict(key, api_name="/pick")
        jobs = [c.submit("Is there a fracture?", False, "brain", [], api_name="/run") for c in clients]
        results = [job.result(timeout=300) for job in jobs]
    finally:
        page.close()
    assert most[0] == 1
    assert all(r[4].startswith("Answered") for r in results) and results[0][:2] == results[1][:2]


def test_app_takes_a_folder_as_eval_and_ask_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run, stage, export or M3D-LaMed folder is a checkpoint for the app too (it was refused as a
    file that does not exist); a missing path is still one line."""
    import signal

    from m3d_lit.cli import main
    from m3d_lit.commands import app

    served: list[Path] = []
    monkeypatch.setattr(app, "serve", lambda args, workdir: served.append(args.checkpoint))
    for key in ("GRADIO_ANALYTICS_ENABLED", "HF_HUB_DISABLE_TELEMETRY", "GRADIO_TEMP_DIR"):
        monkeypatch.setenv(key, "restored after the test")
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        folder = tmp_path / "runs" / "stage3"
        folder.mkdir(parents=True)
        assert main(["app", "--checkpoint", str(folder)]) == 0 and served == [folder]
        assert main(["app", "--checkpoint", str(tmp_path / "missing")]) == 2
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
