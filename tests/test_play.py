"""`python -m decmem_jax.play`: the key -> action mapping, the server's protocol against a stand-in model (fast: busy
second page, unknown keys, a page that disconnects mid-chunk, a full memory bank), the CLI's start-up errors, and
the real thing in headless Chromium driven by Playwright (Debian's /usr/bin/chromium; `.ci/run` installs it).

The browser test saves its screenshot to the test's tmp folder; DECMEM_UPDATE_SCREENSHOTS=1 also writes it to
docs/images/play.png (the README's picture).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from decmem_jax.format import CAMERA_PITCH, CAMERA_YAW, FORWARD_BACK, JUMP_SNEAK_SPRINT, noop
from decmem_jax.play import controls
from decmem_jax.rollout.session import ChunkResult, SessionFull

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


# --------------------------------------------------------------------------------------------------------------------
# Controls
# --------------------------------------------------------------------------------------------------------------------

def test_chunk_actions_layout():
    walk = controls.chunk_actions({"forward"})
    assert walk.shape == (16, 8) and walk.dtype == np.int32
    assert np.all(walk[:, FORWARD_BACK] == 1) and np.all(walk[:, CAMERA_YAW] == 12)
    both = controls.chunk_actions({"forward", "turn_left", "look_down"})
    assert both[0, CAMERA_PITCH] == 13 and both[0, FORWARD_BACK] == 0  # one kind of action per row, as in training
    assert np.all(both[1:4, CAMERA_YAW] == 11) and np.all(both[1:4, FORWARD_BACK] == 0)
    assert np.all(both[4:, FORWARD_BACK] == 1) and np.all(both[4:, CAMERA_YAW] == 12)
    np.testing.assert_array_equal(controls.chunk_actions({"forward", "back", "turn_left", "turn_right"}), noop(16))
    np.testing.assert_array_equal(controls.chunk_actions({"look_up"}, pitch=-60.0), noop(16))  # at the limit
    assert controls.chunk_actions({"look_up"}, pitch=0.0)[0, CAMERA_PITCH] == 11
    assert np.all(controls.chunk_actions({"jump"})[:4, JUMP_SNEAK_SPRINT] == 1)
    np.testing.assert_array_equal(controls.chunk_actions({"fly", "teleport"}), noop(16))


def test_unknown_keys_are_ignored():
    assert controls.controls_for_keys(["KeyW", "KeyQ", "ArrowLeft", None, 7, "F5"]) == {"forward", "turn_left"}
    assert controls.controls_for_keys(["KeyA", "ArrowLeft"]) == {"turn_left"}


# --------------------------------------------------------------------------------------------------------------------
# The server against a stand-in model
# --------------------------------------------------------------------------------------------------------------------

class FakeSession:
    """The Session interface the server uses: 4-frame pieces of a flat colour per chunk, `delay` s per piece."""

    def __init__(self, model, frames):
        self.model, self.context_frames, self.context_latents = model, len(frames), (len(frames) - 1) // 4 + 1
        self.chunks, self.max_chunks, self.prefill_seconds = 0, model.max_chunks, 0.01
        self.frames = [frames]

    chunks_left = property(lambda self: self.max_chunks - self.chunks)
    pose = property(lambda self: np.zeros(5, np.float32))

    def next_poses(self, actions):
        return np.zeros((len(actions), 5), np.float32)

    def frame_of_latent(self, latent):
        return self.frames[0][0]

    def stream(self, actions, poses=None):
        if self.chunks >= self.max_chunks:
            raise SessionFull("the memory bank is full")
        self.model.actions.append(actions)
        return _FakeStream(self, actions)


class _FakeStream:
    def __init__(self, session, actions):
        self.session, self.actions, self.result, self.i = session, actions, None, 0

    def __iter__(self):
        return self

    def __next__(self):
        s = self.session
        if self.i == 4:
            frames = np.full((16, 64, 64, 3), 40 * s.chunks, np.uint8)
            hist = s.context_latents + 4 * s.chunks
            self.result = ChunkResult(frames=frames, actions=self.actions, poses=np.zeros((16, 5), np.float32),
                                      retrieval=np.full(hist, 1 / hist, np.float32), index=s.chunks,
                                      first_frame=s.context_frames + 16 * s.chunks, seconds=0.5)
            s.chunks += 1
            raise StopIteration
        time.sleep(s.model.delay)
        self.i += 1
        return np.full((4, 64, 64, 3), 40 * s.chunks, np.uint8)


class FakeModel:
    def __init__(self, delay=0.01, max_chunks=8):
        self.config = SimpleNamespace(rollout=SimpleNamespace(context_frames=5))
        self.size, self.frames_per_chunk, self.delay, self.max_chunks = (64, 64), 16, delay, max_chunks
        self.actions = []

    def describe(self):
        return dict(weights="fake", steps=1, solver="unipc", guidance=1.0, cfg=False, chunk_frames=16, size=[64, 64],
                    fps=10, memory=True)

    def session(self, frames, actions, poses, *, world=None, max_chunks=64):
        return FakeSession(self, frames)


def _client(model):
    from starlette.testclient import TestClient

    from decmem_jax.play.server import Player, create_app

    return TestClient(create_app(Player(model, world_seed=3, max_chunks=model.max_chunks)))


def _until(ws, kind):
    seen = []
    while True:
        msg = ws.receive_json()
        seen.append(msg["type"])
        if msg["type"] == kind:
            return msg, seen


# starlette.testclient prefers httpx2 and says so; httpx is what the pins hold.
quiet_testclient = pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")


@quiet_testclient
def test_page_protocol_busy_and_unknown_keys():
    model = FakeModel()
    with _client(model) as client:
        assert "decmem-jax play" in client.get("/").text
        assert "WebSocket" in client.get("/static/play.js").text
        with client.websocket_connect("/ws") as ws:
            hello, _ = _until(ws, "hello")
            assert hello["keymap"]["KeyW"] == "forward" and "KeyQ" not in hello["keymap"]
            _until(ws, "context")
            with client.websocket_connect("/ws") as second:
                busy = second.receive_json()
                assert busy["type"] == "busy" and "another tab" in busy["message"]
            ws.send_json({"type": "keys", "held": ["KeyQ", "F12"], "pressed": "KeyQ"})  # unknown: no chunk
            ws.send_json({"type": "keys", "held": [], "pressed": None})
            ws.send_json({"type": "dance"})  # unknown message type: ignored
            ws.send_json({"type": "keys", "held": ["KeyD"], "pressed": "KeyD"})
            ws.send_json({"type": "keys", "held": [], "pressed": None})
            chunk, seen = _until(ws, "chunk")
            assert seen.count("frames") == 4 and chunk["chunk"] == 0 and chunk["controls"] == ["turn_right"]
            assert chunk["fps"] == pytest.approx(32.0) and len(chunk["retrieval"]) == 2 and chunk["top"]
        assert len(model.actions) == 1 and np.all(model.actions[0][:3, CAMERA_YAW] == 13)


@quiet_testclient
def test_disconnect_mid_chunk_is_logged_and_the_server_keeps_serving(caplog):
    model = FakeModel(delay=0.3)
    caplog.set_level(logging.WARNING, logger="decmem_jax.play")
    with _client(model) as client:
        with client.websocket_connect("/ws") as ws:
            _until(ws, "context")
            ws.send_json({"type": "keys", "held": ["KeyW"], "pressed": "KeyW"})
            _until(ws, "frames")  # the chunk is under way; the page goes away
        for _ in range(100):
            if "in the middle of chunk 0" in caplog.text:
                break
            time.sleep(0.05)
        assert "the page disconnected in the middle of chunk 0" in caplog.text
        model.delay = 0.01
        with client.websocket_connect("/ws") as ws:  # not busy: the old page's session is gone
            _until(ws, "context")
            ws.send_json({"type": "keys", "held": [], "pressed": "KeyW"})
            chunk, _ = _until(ws, "chunk")
            assert chunk["chunk"] == 0


@quiet_testclient
def test_full_memory_bank_is_reported_and_restart_starts_over():
    model = FakeModel(max_chunks=1)
    with _client(model) as client, client.websocket_connect("/ws") as ws:
        first, _ = _until(ws, "context")
        ws.send_json({"type": "keys", "held": [], "pressed": "KeyW"})
        _until(ws, "chunk")
        ws.send_json({"type": "keys", "held": [], "pressed": "KeyW"})
        full, _ = _until(ws, "full")
        assert "memory bank is full" in full["message"] and "New world" in full["message"]
        ws.send_json({"type": "restart"})
        again, _ = _until(ws, "context")
        assert again["world"] == first["world"] + 1 and again["chunks_left"] == 1


# --------------------------------------------------------------------------------------------------------------------
# The CLI's start-up errors: one line, exit status 2
# --------------------------------------------------------------------------------------------------------------------

def _play(*args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "decmem_jax.play", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_port_in_use_exits_with_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = _play(f"--port={port}", "--nowarmup")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"error: port {port} on 127.0.0.1 is in use (another play "
                                                    f"server?); pass --port=N, or --port=0 for any free port")
    assert "Traceback" not in proc.stderr


def test_missing_model_path_exits_with_one_line(tmp_path):
    proc = _play("--port=0", "--nowarmup", f"--config.checkpoint={tmp_path}/absent")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: config.checkpoint {tmp_path}/absent: no such folder"), proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------------------------------
# Real browser, real model
# --------------------------------------------------------------------------------------------------------------------

def chromium_path() -> str | None:
    path = os.environ.get("DECMEM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's package)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    page.screenshot(path=str(out))
    if os.environ.get("DECMEM_UPDATE_SCREENSHOTS"):
        (ROOT / "docs" / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, ROOT / "docs" / "images" / name)
    return out


class PlayServer:
    """`python -m decmem_jax.play --port=0` in a child process; the address is read from its first stdout line."""

    def __init__(self, tmp_path: Path, *args):
        self.log = tmp_path / "play.stderr"
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "decmem_jax.play", "--port=0", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True)
        self.url = None
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        reader.join(timeout=420)  # load + compile; slow on a shared 2-core CPU
        if self.url is None:
            self.stop()
            raise AssertionError(f"play did not start: {self.log.read_text()[-2000:]}")

    def _read(self):
        for line in self.proc.stdout:
            m = re.search(r"open (http://127\.0\.0\.1:\d+/)", line)
            if m:
                self.url = m.group(1)
                return

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _number(page, element_id):
    return int(page.text_content(f"#{element_id}") or 0)


@pytest.mark.slow
def test_play_in_headless_chromium(tmp_path):
    chromium_path()
    from playwright.sync_api import sync_playwright

    server = PlayServer(tmp_path, "--max_chunks=16")  # play's own sampler defaults
    try:
        with sync_playwright() as pw:
            browser = launch_chromium(pw)
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(server.url)
            page.wait_for_function("document.body.dataset.state === 'ready'", timeout=180_000)
            before = page.evaluate("document.getElementById('model').toDataURL()")
            page.keyboard.press("KeyQ")  # not a control: nothing happens
            page.wait_for_timeout(1500)
            assert _number(page, "chunks") == 0 and page.evaluate("document.body.dataset.state") == "ready"

            page.keyboard.press("KeyW")  # a tap: one chunk
            page.wait_for_function("Number(document.getElementById('chunks').textContent) >= 1", timeout=120_000)
            page.wait_for_function("Number(document.getElementById('frames-shown').textContent) >= 16",
                                   timeout=30_000)
            assert page.evaluate("document.getElementById('model').toDataURL()") != before  # new frames were drawn
            fps = float(page.text_content("#fps"))
            assert fps > 0
            assert page.locator("#top figure").count() >= 1  # the retrieval thumbnails
            shot = save_screenshot(page, tmp_path, "play.png")
            assert shot.stat().st_size > 10_000

            second = browser.new_page()
            second.goto(server.url)
            second.wait_for_function("document.body.dataset.state === 'busy'", timeout=30_000)
            assert "another tab" in second.text_content("#overlay-text")
            second.close()

            page.keyboard.down("KeyW")  # hold: chunks back to back; leave in the middle of one
            page.wait_for_function("document.body.dataset.state === 'generating'", timeout=120_000)
            page.close()
            third = browser.new_page()
            third.goto(server.url)  # the server keeps serving, and the first page's session is gone
            third.wait_for_function("document.body.dataset.state === 'ready'", timeout=180_000)
            browser.close()
        assert server.proc.poll() is None
    finally:
        server.stop()
    log = server.log.read_text()
    assert "the page disconnected in the middle of chunk" in log, log[-2000:]
    assert "Traceback" not in log, log[-3000:]
