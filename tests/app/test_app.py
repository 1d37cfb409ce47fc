"""`m3d-lit app` in a real headless Chromium: load a prepared scan, ask, check the answer and the overlays.

The app runs as the real command in a subprocess on a free loopback port; Selenium drives Debian's
chromium and chromedriver (`make setup` installs them). Expected answers come from the command line's
own path (`m3d_lit.commands.ask.ask`) on the same files, so the page is checked against the CLI.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e '.[app]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (make setup)")
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WAIT_S = 240.0  # generous: a cold start imports torch and Gradio and loads the model on 2 busy cores
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1700")  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.exists()),
        reason="Debian chromium and chromium-driver are needed (make setup installs them as root)",
    ),
]


def _poll(condition: Callable[[], object], what: str, timeout: float = WAIT_S) -> object:
    """Wait for `condition()` to return something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # the element is not there yet, or is being re-rendered
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SEG_QUESTION = "Segment the hemorrhage."


@pytest.fixture(scope="module")
def seg_checkpoint(stage3_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two-step stage-3 checkpoint, edited so that it answers `SEG_QUESTION` with `[SEG]` first.

    Two steps teach the tiny model no `[SEG]`, so the mask path would go untested. The prompt's last token
    gets an input embedding 100 v (v of RMS 1, where embeddings have RMS ~0.08): the pre-norm layers add
    O(1) to it, so the last position's normed hidden state is w * v to ~1%, and the `[SEG]` output row
    10 (w * v) / |w * v| gives a logit near 10 |w * v| ~ 160 against at most |h| x 1.3 ~ 21 for any other
    token. Questions ending in another token (`?`) are untouched. The LLM is random, so its weights are
    in the checkpoint and loading does not check them against a base.
    """
    import torch

    from m3d_lit.data.collate import LMCollator
    from m3d_lit.inference.loading import load_model
    from m3d_lit.tokens import SEG

    model = load_model(stage3_checkpoint).model
    collate = LMCollator(model.tokenizer, model.num_visual_tokens, model.max_length, model.img_size, True)
    item = {"id": "x", "image": torch.zeros(1, *model.img_size), "question": SEG_QUESTION, "answer": "",
            "kind": "seg", "mask": None, "dataset": "x"}  # fmt: skip
    last = int(collate([item])["input_ids"][0, -1])
    slot = model.new_tokens.token_ids.tolist().index(model.tokenizer.convert_tokens_to_ids(SEG))
    checkpoint = torch.load(stage3_checkpoint, map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    key = {
        end: next(k for k in state if k.endswith(end)) for end in ("embed_tokens.weight", "model.norm.weight")
    }
    v = torch.randn(state[key["embed_tokens.weight"]].shape[1], generator=torch.Generator().manual_seed(0))
    v = v / v.pow(2).mean().sqrt()
    state[key["embed_tokens.weight"]][last] = 100 * v
    direction = state[key["model.norm.weight"]] * v
    state["model.new_tokens.output_rows"][slot] = 10 * direction / direction.norm()
    path = tmp_path_factory.mktemp("seg_checkpoint") / "seg.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def app_server(seg_checkpoint: Path, prepared: list[Path], tmp_path: Path) -> Iterator[dict]:
    """`m3d-lit app` on a free loopback port, its temporary folders under `tmp_path/tmp`."""
    port, tmp = _free_port(), tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "m3d_lit.cli", "app", "--checkpoint", str(seg_checkpoint),
            "--data", *map(str, prepared), "--port", str(port), "--max-new-tokens", "8"]  # fmt: skip
    log = (tmp_path / "app.log").open("w")
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop() -> None:
        """Ctrl-C, as a user stops it; its clean-up then runs."""
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()

    try:
        _poll(
            lambda: "serving" in (tmp_path / "app.log").read_text() or process.poll() is not None, "the app"
        )
        assert process.poll() is None, (tmp_path / "app.log").read_text()[-3000:]
        yield {"url": f"http://127.0.0.1:{port}/", "started": started, "tmp": tmp, "stop": stop}
    finally:
        stop()
        log.close()


@pytest.fixture
def browser(tmp_path: Path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def _value(driver, elem_id: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input").get_attribute(
        "value"
    )


def _pick(driver, elem_id: str, option: str) -> None:
    """Choose `option` in a Gradio dropdown: open it, then click the listed option."""
    driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input").click()
    xpath = f"//*[@id='{elem_id}']//li[@aria-label={json.dumps(option)}]"
    _poll(lambda: driver.find_element(By.XPATH, xpath), f"option {option}").click()


def _pixels(driver, plane: str) -> np.ndarray:
    from PIL import Image

    src = driver.find_element(By.ID, f"m3d-{plane}").get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def _coloured(rgb: np.ndarray) -> int:
    """Pixels that are not grey: a grey slice has R == G == B, an overlay tints them."""
    return int(((rgb.max(axis=-1).astype(int) - rgb.min(axis=-1)) > 0).sum())


def _toggle(driver, overlay: str) -> None:
    driver.find_element(
        By.XPATH, f"//*[@id='m3d-overlays']//label[normalize-space()={json.dumps(overlay)}]"
    ).click()


def _ask(driver, question: str, without_image: bool) -> str:
    box = driver.find_element(By.CSS_SELECTOR, "#m3d-question textarea, #m3d-question input")
    box.clear()
    box.send_keys(question)
    blank = driver.find_element(By.CSS_SELECTOR, "#m3d-blank input")
    if blank.is_selected() != without_image:
        blank.click()

    def answered() -> str | None:
        # while it works, Gradio writes its progress ("processing | 0.4/2.0s") above the previous answer's
        # status: the answer is there when the status is one "Answered ..." line that was not there before
        text = driver.find_element(By.ID, "m3d-status").text.strip()
        return text if text != before and "\n" not in text and text.startswith("Answered") else None

    before = driver.find_element(By.ID, "m3d-status").text.strip()
    driver.find_element(By.ID, "m3d-ask").click()
    return str(_poll(answered, "an answer"))


def _expected(checkpoint: Path, volume: Path, question: str) -> tuple[str, object, float]:
    """The command line's answer and mask logits, and P(Yes) from a plain forward pass in float64."""
    import torch

    from m3d_lit.commands.ask import ask
    from m3d_lit.data.collate import LMCollator
    from m3d_lit.inference.loading import load_model
    from m3d_lit.inference.predictor import Predictor, yes_no_ids

    answer = ask(Predictor.load(checkpoint, max_new_tokens=8), volume, question)
    text, logits, image = answer.prediction.text, answer.prediction.seg_logits, answer.prepared.image
    model = load_model(checkpoint).model  # LoRA unmerged: an independent path to the same numbers
    collate = LMCollator(model.tokenizer, model.num_visual_tokens, model.max_length, model.img_size, True)
    item = {"id": "x", "image": torch.from_numpy(image), "question": question, "answer": "", "kind": "closed",
            "mask": None, "dataset": "x"}  # fmt: skip
    batch = collate([item])
    with torch.no_grad():
        hidden, _ = model.decode(
            model.embed(batch["images"], batch["input_ids"]), batch["attention_mask"], None
        )
        last = model.logits(hidden[:, -1]).double()[0]
    yes, no = yes_no_ids(model.tokenizer)
    return text, logits, float(1 / (1 + torch.exp(last[no] - last[yes])))


def _check_mask_download(driver, expected: np.ndarray, tmp_path: Path) -> None:
    """The page's mask link serves the NIfTI that `ask --mask-out` writes for this scan (a prepared scan
    has no source geometry, so the model grid with the affine that declares its axes)."""
    import urllib.request

    import nibabel as nib

    from m3d_lit.data.geometry import write_mask

    link = _poll(lambda: driver.find_element(By.CSS_SELECTOR, "#m3d-mask a[href]"), "the mask link")
    href = link.get_attribute("href")
    assert href.startswith("http://127.0.0.1:") and "_mask.nii.gz" in href
    path = tmp_path / "downloaded_mask.nii.gz"
    with urllib.request.urlopen(href, timeout=60) as response:
        path.write_bytes(response.read())
    reference = tmp_path / "expected_mask.nii.gz"
    write_mask(reference, expected.astype(np.float32), None)
    got, want = nib.load(path), nib.load(reference)
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj))
    np.testing.assert_array_equal(got.affine, want.affine)
    assert np.asarray(got.dataobj).sum() == expected.sum()


def _check_prepared_scan(driver, key: str, reference_answer: str) -> None:
    """Pick the scan: its reference answers are listed and the reference overlay can be toggled."""
    _pick(driver, "m3d-prepared", key)
    _poll(lambda: key in driver.find_element(By.ID, "m3d-scan-name").text, "the slices")
    assert reference_answer in driver.find_element(By.ID, "m3d-reference").text
    # the slider starts on the reference mask's largest slice: the green overlay is there, then it is not
    with_reference = _pixels(driver, "axial")
    assert _coloured(with_reference) > 0
    _toggle(driver, "reference")
    _poll(lambda: _coloured(_pixels(driver, "axial")) == 0, "the slice without the reference overlay")
    _toggle(driver, "reference")
    _poll(lambda: np.array_equal(_pixels(driver, "axial"), with_reference), "the reference overlay back")


def _check_closed(driver, checkpoint: Path, volume: Path, tmp_path: Path, started: float) -> str:
    """A closed question with the blank-volume switch: both answers and both P(Yes) as the CLI gives them.

    Returns the time from the app's start to this first answer, and the page's status line."""
    question = "Is there a fracture?"
    status = _ask(driver, question, without_image=True)
    timing = f"{time.perf_counter() - started:.1f} s from `m3d-lit app` start to the first answer ({status})"
    np.save(tmp_path / "blank.npy", np.zeros((1, 32, 64, 64), np.float32))
    for suffix, scan in (("", volume), ("-blank", tmp_path / "blank.npy")):
        text, _, p_yes = _expected(checkpoint, scan, question)
        assert _value(driver, f"m3d-answer{suffix}") == text
        # the page shows 3 decimals (rounding <= 5e-4); the cached and the plain forward pass differ by far less
        assert abs(float(_value(driver, f"m3d-pyes{suffix}")) - p_yes) <= 6e-4
    return timing


def _check_segmentation(driver, checkpoint: Path, volume: Path, tmp_path: Path) -> None:
    """A [SEG] answer: the mask's voxel count, its overlay toggled on its own, and its NIfTI download."""
    status = _ask(driver, SEG_QUESTION, without_image=False)
    text, logits, _ = _expected(checkpoint, volume, SEG_QUESTION)
    assert text.startswith("[SEG]") and _value(driver, "m3d-answer") == text
    assert _value(driver, "m3d-pyes") == ""  # not a yes/no question
    expected_mask = (logits.sigmoid() > 0.5).numpy().astype(np.uint8)[0]
    assert f"predicted mask: {int(expected_mask.sum())} voxels" in status and expected_mask.any()
    _toggle(driver, "reference")
    _poll(lambda: _coloured(_pixels(driver, "axial")) > 0, "the slice with the predicted overlay alone")
    _toggle(driver, "predicted")
    _poll(lambda: _coloured(_pixels(driver, "axial")) == 0, "the slice without any overlay")
    _toggle(driver, "predicted")
    _toggle(driver, "reference")
    _check_mask_download(driver, expected_mask, tmp_path)


def _check_uploads(driver, nifti: Path, tmp_path: Path, app_tmp: Path) -> None:
    """A bad upload shows the CLI's one-line error; a NIfTI loads in HU, the bone window redraws it, and
    no uploaded copy stays behind."""
    bad = tmp_path / "bad scan.nii.gz"
    bad.write_bytes(b"\x1f\x8b truncated")
    driver.find_element(By.CSS_SELECTOR, "#m3d-upload input[type=file]").send_keys(str(bad))
    line = str(
        _poll(lambda: driver.find_element(By.CSS_SELECTOR, "#m3d-error .m3d-error-line").text, "the error")
    )
    assert line.startswith("Error: bad scan.nii.gz: cannot read NIfTI") and "\n" not in line
    _poll(lambda: driver.find_element(By.CSS_SELECTOR, "#m3d-upload input[type=file]"), "an empty upload box")
    driver.find_element(By.CSS_SELECTOR, "#m3d-upload input[type=file]").send_keys(str(nifti))
    _poll(lambda: nifti.name in driver.find_element(By.ID, "m3d-scan-name").text, "the uploaded scan")
    _poll(
        lambda: not driver.find_elements(By.CSS_SELECTOR, "#m3d-error .m3d-error-line"), "the error cleared"
    )
    brain = _pixels(driver, "axial")
    driver.find_element(By.XPATH, "//*[@id='m3d-window']//label[normalize-space()='bone']").click()
    _poll(lambda: not np.array_equal(_pixels(driver, "axial"), brain), "the bone window")
    assert not [p for p in app_tmp.rglob("*") if p.name in (nifti.name, bad.name)]


def _outside_requests(driver, port: str) -> list[str]:
    """Every http(s)/ws address the page asked for that is not the app itself."""
    messages = (json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
    urls = {m.get("params", {}).get("request", {}).get("url", "") for m in messages}
    own = (f"http://127.0.0.1:{port}/", f"ws://127.0.0.1:{port}/")
    return sorted(u for u in urls if u.startswith(("http", "ws")) and not u.startswith(own))


def test_app_in_headless_chromium(
    app_server: dict, browser, seg_checkpoint: Path, prepared: list[Path], synthetic_raw: Path, tmp_path: Path
) -> None:
    rows = [json.loads(line) for line in (prepared[1] / "qa_test.jsonl").read_text().splitlines()]
    seg = next(r for r in rows if r["kind"] == "seg" and np.load(prepared[1] / r["mask"]).any())
    key, volume = f"physionet/{Path(seg['image']).stem}", prepared[1] / seg["image"]
    browser.get(app_server["url"])
    _poll(lambda: browser.find_element(By.CSS_SELECTOR, "#m3d-prepared input"), "the page")
    _check_prepared_scan(browser, key, seg["answer"])
    print("\n" + _check_closed(browser, seg_checkpoint, volume, tmp_path, app_server["started"]))
    _check_segmentation(browser, seg_checkpoint, volume, tmp_path)
    screenshot = tmp_path / "app.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    nifti = sorted((synthetic_raw / "physionet" / "ct_scans").glob("*.nii"))[0]
    _check_uploads(browser, nifti, tmp_path, app_server["tmp"])
    browser.save_screenshot(str(tmp_path / "app_upload.png"))
    assert not _outside_requests(browser, app_server["url"].rsplit(":", 1)[1].rstrip("/"))
    app_server["stop"]()
    assert list(app_server["tmp"].iterdir()) == [], "the app left temporary files behind"
