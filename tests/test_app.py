"""The Gradio demo (app.py): served on loopback, queried with gradio_client, rendered in headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import app  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}
SEVEN, THREE = "a red handwritten digit seven", "a red handwritten digit three"


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="module")
def erased_seven(tmp_path_factory) -> Path:
    """"seven" erased from the embedded model with a short SalUn run (about half a minute)."""
    tmp = tmp_path_factory.mktemp("app")
    out = tmp / "seven-erased"
    from test_train import train_in_process

    proc = train_in_process(["--model", "digits", "--concept", "seven", "--num-images", "16", "--max-train-steps", "40",
                             "--learning-rate", "2e-4", "--train-batch-size", "8", "--saliency-batch-size", "16",
                             "--output-dir", str(out), "--cache-dir", str(tmp / "cache")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def server(erased_seven: Path):
    demo = app.build_app("digits", str(erased_seven), app.digits_labeller())
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def gallery_images(gallery) -> list[tuple[np.ndarray, str]]:
    out = []
    for item in gallery:
        image = item["image"]
        path = image if isinstance(image, str) else image["path"]
        out.append((np.asarray(Image.open(path).convert("RGB"), dtype=np.float32), item.get("caption") or ""))
    return out


def test_client_gets_before_and_after_images(server: str) -> None:
    from gradio_client import Client

    client = Client(server, verbose=False)
    diffs, captions = {}, {}
    for prompt in (SEVEN, THREE):
        original, erased, status = client.predict(prompt, 0, 25, 5.0, 4, True, api_name="/generate")
        before, after = gallery_images(original), gallery_images(erased)
        assert len(before) == len(after) == 4 and "seeds 0-3" in status
        diffs[prompt] = float(np.mean([np.abs(a - b).mean() for (a, _), (b, _) in zip(before, after)]))
        captions[prompt] = ([c for _, c in before], [c for _, c in after])
    # the erased concept: the images change and the classifier no longer sees a seven
    assert all(c.startswith("seven") for c in captions[SEVEN][0])
    assert not any(c.startswith("seven") for c in captions[SEVEN][1])
    # another digit: the same seeds give nearly the same images, still read as three
    assert all(c.startswith("three") for c in captions[THREE][0] + captions[THREE][1])
    assert diffs[SEVEN] > 1.5 * diffs[THREE], diffs


def test_empty_prompt_gets_a_message_in_the_page(server: str) -> None:
    from gradio_client import Client

    original, erased, status = Client(server, verbose=False).predict("  ", 0, 25, 5.0, 2, False, api_name="/generate")
    assert original == [] and erased == [] and "Please enter a prompt" in status


@pytest.mark.parametrize(("inputs", "message"), [
    ((SEVEN, 0, 0, 5.0, 2, False), "Value 0 is less than minimum value 1"),
    ((SEVEN, 0, 25, 5.0, 50, False), "Value 50 is greater than maximum value 8"),
    ((SEVEN, -3, 25, 5.0, 2, False), "Value -3 is less than minimum value 0"),
])
def test_out_of_range_controls_get_one_readable_line(server: str, inputs, message: str) -> None:
    """Gradio checks the controls' bounds itself and shows its message in the page: no traceback."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        Client(server, verbose=False).predict(*inputs, api_name="/generate")
    assert str(err.value).strip().rstrip(".") == message


def test_run_checks_inputs_itself() -> None:
    assert app.check_inputs("", 0, 25, 5.0, 1) == "Please enter a prompt."
    assert "Steps" in app.check_inputs(SEVEN, 0, 0, 5.0, 1)
    assert "Guidance" in app.check_inputs(SEVEN, 0, 25, 99.0, 1)
    assert "number of images" in app.check_inputs(SEVEN, 0, 25, 5.0, 9)
    assert app.check_inputs(SEVEN, 0, 25, 5.0, 1) is None


def test_serves_loopback_only_and_calls_no_one_by_default(monkeypatch) -> None:
    """With the variables unset (conftest sets them for the other tests), loading the app turns Gradio's
    analytics and the hub's telemetry off."""
    import importlib

    args = app.parse_args([])
    assert args.host == "127.0.0.1" and not args.share
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED")
    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY")
    importlib.reload(app)
    assert (os.environ.get("GRADIO_ANALYTICS_ENABLED"), os.environ.get("HF_HUB_DISABLE_TELEMETRY")) == ("False", "1")


def test_a_named_port_is_the_port(tiny_sd_path: Path, monkeypatch, capsys) -> None:
    """$GRADIO_SERVER_PORT (or --port) taken: one line and exit 1, before any model loads, instead of
    Gradio's silent move to one of the next 100 ports."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        monkeypatch.setenv("GRADIO_SERVER_PORT", str(port))
        rc = app.main(["--original", str(tiny_sd_path), "--erased", str(tiny_sd_path)])
    assert rc == 1 and capsys.readouterr().err == f"error: port {port} on 127.0.0.1 is in use (pass --port with a free one)\n"


def test_example_prompts_come_from_the_concept_files() -> None:
    examples = app.example_prompts("digits")
    assert "a red handwritten digit zero" in examples and not any("nude" in p for p in examples)
    assert any("nude" in p for p in app.example_prompts("CompVis/stable-diffusion-v1-4"))


def test_a_folder_that_erased_several_concepts_leads_with_a_prompt_of_each(tmp_path) -> None:
    import json

    from erase.concepts import load_concept

    seven, red = load_concept("seven"), load_concept("red")
    erased = tmp_path / "two"
    erased.mkdir()
    (erased / "erase_config.json").write_text(json.dumps({
        "config": {"pretrained_model_name_or_path": "digits"}, "concept": {"name": "seven+red"},
        "concepts": [{"name": "seven", "forget": seven.forget, "eval": seven.eval}, {"name": "red", "forget": red.forget, "eval": red.eval}]}))
    assert [c["name"] for c in app.erased_concepts(str(erased))] == ["seven", "red"]
    examples = app.example_prompts("digits", str(erased))
    assert examples[:4] == [seven.forget[0], seven.eval[0], red.forget[0], red.eval[0]], examples
    assert app.erased_concepts(str(tmp_path / "none")) == []  # a folder erased elsewhere: no record, no concepts
    for damaged in ("{not json", "[]", '{"config": {}}'):  # a record that is there and unreadable is refused
        (erased / "erase_config.json").write_text(damaged)
        with pytest.raises(ValueError, match="erase_config.json cannot be read"):
            app.erased_concepts(str(erased))


@pytest.mark.skipif(find_chromium() is None and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (.ci/run installs it in CI)")
def test_headless_chromium_renders_both_panels(erased_seven: Path, tmp_path: Path) -> None:
    assert find_chromium(), "chromium is missing in CI: .ci/run should have installed it"
    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--erased", str(erased_seven), "--port", str(port)],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{port}/")
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:  # Debian's chromium: no browser download
            browser = playwright.chromium.launch(executable_path=find_chromium(), args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(f"http://127.0.0.1:{port}/")
            # the page generates the first prompt's images on opening: wait until both galleries show them
            page.wait_for_function("['original', 'erased'].every(id => document.querySelectorAll(`#${id} img`).length == 4)",
                                   timeout=120_000)
            page.wait_for_timeout(1000)  # let the images paint
            boxes = [list(page.locator(f"#{name}").bounding_box().values()) for name in ("original", "erased")]
            png = page.screenshot()
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    outside = [u for u in requests if not u.startswith((f"http://127.0.0.1:{port}/", "data:", "blob:"))]
    assert requests and not outside, f"the page made outbound requests: {outside[:5]}"
    (tmp_path / "page.png").write_bytes(png)
    page = np.asarray(Image.open(tmp_path / "page.png").convert("RGB")).astype(np.int32)
    for name, (x, y, w, h) in zip(("original", "erased"), boxes):
        assert w > 200 and h > 100, f"the {name} panel is not laid out: {w}x{h}"
        panel = page[int(y):int(y + h), int(x):int(x + w)]
        # the generated digits are coloured strokes on near-black squares; the page around them is light
        dark = float((panel.max(axis=2) < 40).mean())
        assert dark > 0.05, f"the {name} panel shows no generated images in the screenshot ({dark:.1%} dark)"
