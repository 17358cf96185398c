"""The play web app (Starlette): one page at a time steers the world model with the keyboard, chunk by chunk.

Protocol (JSON over one WebSocket, /ws):

    page -> server   {"type": "keys", "held": [KeyboardEvent.code, ...], "pressed": code | null}
                     {"type": "restart"}                       a new world and a fresh memory bank
    server -> page   {"type": "hello", "settings": {...}, "keymap": {...}}
                     {"type": "status", "message": "..."}
                     {"type": "context", "frame": png, "truth": png, "frames": n}
                     {"type": "frames", "chunk": k, "first": i, "frames": [png x4], "truth": [png x4]}
                     {"type": "chunk", "chunk": k, "seconds": s, "fps": f, "retrieval": [...], "top": [...], ...}
                     {"type": "busy" | "full" | "error", "message": "..."}

A chunk runs while any known key is held, or once for a key tapped since the previous chunk (so a quick tap is not
lost while a chunk is generating); with no key, nothing is generated. Unknown keys are ignored (the page only sends
known ones; the server drops any other). All model work runs on ONE worker thread: a page that disconnects in the
middle of a chunk stops the chunk at its next decoded piece and its session is dropped whole, and the next page's
work waits for that thread, so no two computations ever share a memory bank.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from decmem_jax.play import controls as controls_lib
from decmem_jax.rollout.session import SessionError, SessionFull, world_clip

log = logging.getLogger("decmem_jax.play")
STATIC = Path(__file__).resolve().parent / "static"
BUSY_GRACE_S = 2.0  # how long a new page waits for a closing one before it is told the model is busy
TOP_RETRIEVED = 3  # thumbnails of the most retrieved latent frames shown under the strip


def png(frame: np.ndarray) -> str:
    """A uint8 [H, W, 3] frame as a PNG data URL (64x64: ~5 kB; the page scales it up without smoothing)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=1)  # speed over size: it goes over loopback
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Player:
    """The loaded model, the one worker thread that runs it, and which page (if any) is playing."""

    def __init__(self, model, *, world_seed: int = 1000, max_chunks: int = 64):
        self.model = model
        self.world_seed = int(world_seed)
        self.max_chunks = int(max_chunks)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="play-model")
        self.active: Page | None = None
        self.chunks_served = 0

    def new_session(self, seed: int):
        """(Session, WorldClip): a random walk of `context_frames` frames in world `seed`, prefilled. Worker only."""
        clip = world_clip(seed, int(self.model.config.rollout.context_frames), self.model.size)
        session = self.model.session(clip.frames, clip.actions, clip.poses, world=clip.world,
                                     max_chunks=self.max_chunks)
        return session, clip

    def warm_up(self) -> float:
        """Compiles everything a page needs (prefill, one chunk, decode) so the first page answers at once."""
        session, _ = self.new_session(self.world_seed)
        result = session.step(controls_lib.chunk_actions({"forward"}, self.model.frames_per_chunk))
        return session.prefill_seconds + result.seconds

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)


class Page:
    """One connected page: its session, the keys it holds, the chunk loop."""

    def __init__(self, player: Player, ws: WebSocket):
        self.player, self.ws = player, ws
        self.loop = asyncio.get_running_loop()
        self.held: set[str] = set()
        self.tapped: set[str] = set()
        self.wake = asyncio.Event()
        self.closed = False
        self.restart = False
        self.cancel = threading.Event()  # seen by the worker between decoded pieces
        self.seed = player.world_seed
        self.session = self.clip = None

    async def send(self, message: dict) -> None:
        if self.closed:
            return
        try:
            await self.ws.send_json(message)
        except (WebSocketDisconnect, RuntimeError, OSError):  # the page went away while we were sending
            self._gone()

    def _log_dropped(self, index: int) -> None:
        log.warning("the page disconnected in the middle of chunk %d; that chunk was dropped with its session "
                    "(the server keeps serving)", index)

    def _gone(self) -> None:
        self.closed = True
        self.cancel.set()
        self.wake.set()

    async def read(self) -> None:
        """Applies the page's messages as they come; a disconnect ends the page."""
        try:
            while True:
                msg = await self.ws.receive_json()
                if not isinstance(msg, dict):
                    continue
                if msg.get("type") == "keys":
                    held = msg.get("held") if isinstance(msg.get("held"), list) else []
                    self.held = controls_lib.controls_for_keys(held)
                    self.tapped |= controls_lib.controls_for_keys([msg.get("pressed")])
                elif msg.get("type") == "restart":
                    self.restart = True
                else:
                    continue  # unknown message types are ignored like unknown keys
                self.wake.set()
        except (WebSocketDisconnect, RuntimeError, ValueError, OSError):  # ValueError: not JSON
            self._gone()

    async def start_session(self) -> bool:
        """A fresh session in world `self.seed`; False (the page told, the log written) if it could not start."""
        await self.send({"type": "status", "message": f"preparing world {self.seed}: encoding the context clip "
                                                      f"into the memory bank..."})
        try:
            self.session, self.clip = await self.loop.run_in_executor(self.player.worker, self.player.new_session,
                                                                      self.seed)
        except Exception as e:  # noqa: BLE001 -- one message to the page and the log; the server keeps serving
            log.error("could not start a session: %s", e, exc_info=not isinstance(e, SessionError))
            await self.send({"type": "error", "message": f"could not start a session: {e}"})
            return False
        last = self.clip.frames[-1]
        await self.send({"type": "context", "frame": png(last), "truth": png(last), "world": self.seed,
                         "frames": int(self.session.context_frames), "chunks_left": self.session.chunks_left,
                         "prefill_seconds": round(self.session.prefill_seconds, 2)})
        await self.send({"type": "status", "message": "ready: hold W to walk, A/D or arrows to turn and look"})
        return True

    async def run(self) -> None:
        model = self.player.model
        await self.send({"type": "hello", "settings": model.describe(), "keymap": controls_lib.KEYMAP})
        reader = asyncio.create_task(self.read())
        try:
            if not await self.start_session():
                return
            while not self.closed:
                await self.wake.wait()
                self.wake.clear()
                if self.closed:
                    break
                if self.restart:
                    self.restart, self.tapped, self.seed = False, set(), self.seed + 1
                    self.session = None  # the old memory bank is freed before the new one is built
                    if not await self.start_session():
                        return
                    continue
                wanted = self.held | self.tapped
                self.tapped = set()
                if not wanted:
                    continue
                if not await self.chunk(wanted):
                    break
                if self.held:  # keep going while a key is held
                    self.wake.set()
        finally:
            reader.cancel()

    async def chunk(self, wanted: set[str]) -> bool:
        """Generates and streams one chunk; False when the page is gone or the session cannot go on."""
        session, clip, model = self.session, self.clip, self.player.model
        actions = controls_lib.chunk_actions(wanted, model.frames_per_chunk, pitch=float(session.pose[3]))
        index = session.chunks
        queue: asyncio.Queue = asyncio.Queue()

        def put(item):
            self.loop.call_soon_threadsafe(queue.put_nowait, item)

        def work():  # on the worker thread: generate, decode, encode PNGs; never touches the socket
            try:
                poses = session.next_poses(actions)
                truth = clip.render(poses)
                stream = session.stream(actions, poses)
                first = session.context_frames + index * model.frames_per_chunk
                done = 0
                for piece in stream:
                    if self.cancel.is_set():  # the page is gone: stop here, the session is dropped with it
                        put(("cancelled", None))
                        return
                    put(("frames", {"type": "frames", "chunk": index, "first": first + done,
                                    "frames": [png(f) for f in piece],
                                    "truth": [png(f) for f in truth[done: done + len(piece)]]}))
                    done += len(piece)
                put(("done", stream.result))
            except Exception as e:  # noqa: BLE001 -- reported to the page and the log, the server keeps serving
                put(("error", e))

        self.loop.run_in_executor(self.player.worker, work)
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "frames":
                    await self.send(payload)
                    continue
                break
        except asyncio.CancelledError:  # the server cancels the page's task when the connection goes (some servers)
            self._gone()
            self._log_dropped(index)
            raise
        if kind == "cancelled" or self.closed:
            self._log_dropped(index)
            return False
        if kind == "error":
            if isinstance(payload, SessionFull):
                await self.send({"type": "full", "message": f"{payload}. Press 'New world' to start again."})
                self.held, self.tapped = set(), set()
                return True
            log.error("chunk %d failed: %s", index, payload, exc_info=payload)
            message = str(payload) if isinstance(payload, SessionError) else f"{type(payload).__name__}: {payload}"
            await self.send({"type": "error", "message": f"chunk {index} failed: {message}"})
            return False
        result = payload
        self.player.chunks_served += 1
        top = []
        if result.retrieval is not None and result.retrieval.size:
            for j in np.argsort(-result.retrieval, kind="stable")[:TOP_RETRIEVED]:
                if result.retrieval[j] > 0:
                    top.append({"latent": int(j), "share": round(float(result.retrieval[j]), 3),
                                "frame": png(session.frame_of_latent(int(j)))})
        await self.send({"type": "chunk", "chunk": index, "seconds": round(result.seconds, 3),
                         "fps": round(result.fps, 2), "frames": len(result.frames),
                         "controls": sorted(wanted), "context_latents": session.context_latents,
                         "retrieval": None if result.retrieval is None else np.round(result.retrieval, 4).tolist(),
                         "top": top, "chunks_left": session.chunks_left})
        return True


def create_app(player: Player) -> Starlette:
    async def index(request):
        return FileResponse(STATIC / "index.html")

    async def socket(ws: WebSocket):
        await ws.accept()
        # A reloaded page connects about when its old connection closes: give a closing page a moment to go.
        for _ in range(int(BUSY_GRACE_S / 0.05)):
            if player.active is None or player.active.closed:
                break
            await asyncio.sleep(0.05)
        if player.active is not None and not player.active.closed:
            log.info("a second page connected while one is playing: told it the model is busy")
            await ws.send_json({"type": "busy", "message": "Busy: another tab or window is already playing (one "
                                                           "model session per server). Close it, then reload."})
            await ws.close(code=1013)
            return
        # A page that has gone may still be finishing its chunk on the worker; the new page's work queues behind it.
        page = player.active = Page(player, ws)
        try:
            await page.run()
        finally:
            page._gone()
            if player.active is page:
                player.active = None

    return Starlette(routes=[Route("/", index), WebSocketRoute("/ws", socket),
                             Mount("/static", StaticFiles(directory=STATIC), name="static")])
