"""`facegen ui`: the page's handlers on the tiny model, and the page itself in a real headless browser."""

import json
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from facegen_cli.cli import app
from facegen_cli.errors import FacegenError
from facegen_cli.pipeline import FacegenPipeline
from test_edit import write_face_photo

pytest.importorskip("gradio")
runner = CliRunner()


def test_the_page_makes_the_faces_its_command_line_makes(tmp_path, tiny_model_dir):
    from facegen_cli.ui import GenerateRequest, generate_faces

    pipe = FacegenPipeline.load(tiny_model_dir, precision="auto")
    choices = {name: "free" for name in pipe.attributes} | {"male": "for", "beard": "against"}
    request = GenerateRequest(choices, count=3, seed=5, steps=2, guidance=2.5, sampler="heun")
    paths, command = generate_faces(pipe, request, tmp_path / "ui", str(tiny_model_dir))
    assert command.startswith("facegen generate --male --no-beard -n 3 --seed 5 --steps 2 --guidance 2.5 ")
    result = runner.invoke(app, [*shlex.split(command)[1:], "--out", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.stderr
    cli_paths = result.stdout.split()
    assert [Path(p).name for p in cli_paths] == [p.name for p in paths]
    for ours, theirs in zip(paths, cli_paths):
        with Image.open(ours) as a, Image.open(theirs) as b:
            assert np.array_equal(np.asarray(a), np.asarray(b))
            assert json.loads(a.text["facegen"]) == json.loads(b.text["facegen"])  # the same request recorded


def test_the_edit_handler_edits_one_photo_and_explains_what_it_cannot(tmp_path, tiny_model_dir):
    pytest.importorskip("mediapipe")
    from facegen_cli.landmarks import FaceFinder
    from facegen_cli.ui import edit_photo, faces_in_photo

    pipe = FacegenPipeline.load(tiny_model_dir)
    photo = write_face_photo(tmp_path / "photo.png")
    finder = FaceFinder()
    assert faces_in_photo(finder, photo) == ["every face", "face 0 (from the left)"]
    edited, mask = edit_photo(pipe, None, photo, ["mustache"], [], None, 0, None, tmp_path / "out")
    original, result, changed = (np.asarray(Image.open(p)) for p in (photo, edited, mask))
    assert result.shape == original.shape and changed.shape == original.shape[:2]
    assert np.array_equal(result[changed == 0], original[changed == 0]) and (changed > 0).any()
    from facegen_cli.files import NEW_DIR_MODE

    assert edited.parent.stat().st_mode & 0o777 == NEW_DIR_MODE  # a folder like any other, not mkdtemp's 0700

    grass = tmp_path / "grass.png"
    Image.fromarray(np.full((200, 200, 3), (40, 160, 60), dtype=np.uint8)).save(grass)
    assert faces_in_photo(finder, grass) == ["every face"]
    with pytest.raises(FacegenError, match="no face found"):
        edit_photo(pipe, None, grass, ["mustache"], [], None, 0, None, tmp_path / "out")
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    with pytest.raises(FacegenError, match="cannot read the image"):
        edit_photo(pipe, None, notes, ["mustache"], [], None, 0, None, tmp_path / "out")
    with pytest.raises(FacegenError, match="nothing to change"):
        edit_photo(pipe, None, photo, [], [], None, 0, None, tmp_path / "out")
    finder.close()


def test_without_gradio_the_command_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    result = runner.invoke(app, ["ui", "--out", str(tmp_path / "ui")])
    assert result.exit_code == 1 and 'pip install -e ".[ui]"' in result.stderr and "Traceback" not in result.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium as root in a container, on a machine with no network: no sandbox, no background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_the_page_generates_and_edits_in_a_real_browser(tmp_path, tiny_model_dir):
    """Opens the page in headless Chromium, asks for two attributes, generates, finds the faces; then
    uploads a photo, edits it and finds the result. FACEGEN_UI_MODEL picks another model and
    FACEGEN_UI_SCREENSHOTS a folder for a screenshot of each tab, FACEGEN_UI_PHOTO the photo to edit (how
    the README's were taken)."""
    pytest.importorskip("mediapipe")
    playwright = pytest.importorskip("playwright.sync_api")
    from facegen_cli.ui import build_app

    model = os.environ.get("FACEGEN_UI_MODEL") or str(tiny_model_dir)
    pipe = FacegenPipeline.load(model, precision="auto")
    page_app = build_app(pipe, pipe.load_classifier(), tmp_path / "out", model)
    port = free_port()
    page_app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                    allowed_paths=[str(tmp_path / "out")])
    shots = Path(os.environ.get("FACEGEN_UI_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    photo = Path(os.environ.get("FACEGEN_UI_PHOTO") or write_face_photo(tmp_path / "photo.png"))
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("#attr-male").get_by_label("for").check()
            page.locator("#attr-beard").get_by_label("against").check()
            page.locator("#generate").click()
            faces = page.locator("#gallery img")
            faces.nth(7).wait_for(timeout=120_000)  # 8 faces, the default count
            assert faces.count() >= 8
            assert "--male --no-beard -n 8" in page.locator("#command textarea").input_value()
            page.screenshot(path=str(shots / "ui-generate.png"), full_page=True)

            page.get_by_role("tab", name="Edit").click()
            page.locator("#photo input[type=file]").set_input_files(str(photo))
            page.locator("#add").get_by_label("mustache").check()
            page.locator("#edit").click()
            page.locator("#after img").wait_for(timeout=120_000)
            page.screenshot(path=str(shots / "ui-edit.png"), full_page=True)
            browser.close()
    finally:
        page_app.close()
    edited = list((tmp_path / "out").glob(f"edited-*/{photo.name}"))
    assert len(edited) == 1 and Image.open(edited[0]).size == Image.open(photo).size


def test_a_port_in_use_fails_in_one_line_before_the_model_loads(tmp_path):
    pytest.importorskip("gradio")
    from typer.testing import CliRunner

    from facegen_cli.cli import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["ui", "--port", str(port), "--out", str(tmp_path / "ui"),
                                          "--model", str(tmp_path / "no-such-model")])
    assert result.exit_code != 0 and result.stdout == ""
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_the_ui_command_prints_only_its_url_and_stops_quietly_on_ctrl_c(tmp_path, tiny_model_dir):
    """stdout carries the URL alone (Gradio's own "closing server" line went there on Ctrl-C)."""
    import signal
    import subprocess
    import urllib.request

    pytest.importorskip("gradio")
    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "facegen_cli.cli", "ui", "--model", str(tiny_model_dir), "--port",
                              str(port), "--out", str(tmp_path / "ui")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        url = child.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}"
        for _ in range(300):  # the page answers once it is up
            try:
                assert urllib.request.urlopen(url, timeout=5).status == 200
                break
            except OSError:
                time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0, (out, err)
    assert out == ""  # nothing after the URL
