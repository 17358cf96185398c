"""Play the world model in a browser: `python -m decmem_jax.play`, then open the printed http://127.0.0.1 address.

    python -m decmem_jax.play                                   # the shipped world-tiny model, port 8000
    python -m decmem_jax.play --port=0 --steps=10 --guidance=2.0   # any free port; the rollout CLI's sampler
    python -m decmem_jax.play --config=configs/world_tiny.py:decmem --config.checkpoint=runs/world_tiny/decmem

Hold W (S) to walk forward (back), A/D or the left/right arrows to turn, up/down arrows to look, space to jump.
Each chunk (16 frames) is generated under the keys held when it starts and streamed to the page as the VAE decodes
it; the page shows the generated frames per second, the ground truth rendered from the same poses, and which
earlier frames the Sparse Global Memory retrieved for the chunk.

Sampler defaults favour responsiveness over the rollout CLI's quality settings: 4 UniPC steps without action CFG
(one branch, 5 forwards per chunk) instead of 10 steps with CFG 2.0 (21 batch-2 forwards); see
docs/results/2026-12-02_play_fps_cpu.json for what that buys and costs. The server listens on 127.0.0.1 only, loads
the model and compiles it before it prints its address (the first time ~1 minute on a 2-core CPU), and serves one
page at a time: a second tab is told the model is busy.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
import time

from absl import app, flags

from decmem_jax.rollout import __main__ as rollout_cli  # defines --config (and --seed), as the rollout CLI takes them
from decmem_jax.rollout.session import ROOT, SessionError

HOST = "127.0.0.1"  # a local toy: never listen beyond this machine
DEFAULT_CONFIG = f"{ROOT / 'configs' / 'world_tiny.py'}:decmem"

_PORT = flags.DEFINE_integer("port", 8000, "TCP port on 127.0.0.1 (0: any free port; the address is printed)")
_STEPS = flags.DEFINE_integer("steps", 4, "sampler steps per chunk (overrides config.rollout.steps)")
_GUIDANCE = flags.DEFINE_float("guidance", 1.0, "action CFG scale (1.0: off, one branch; overrides "
                               "config.rollout.guidance)")
_WORLD = flags.DEFINE_integer("world_seed", 1000, "procedural world of the first page (New world: the next seed)")
_MAX_CHUNKS = flags.DEFINE_integer("max_chunks", 64, "chunks a session can generate before its memory bank is full "
                                   "(64 chunks = 1024 frames)")
_WARMUP = flags.DEFINE_boolean("warmup", True, "compile before serving, so the first page does not wait")
flags.declare_key_flag("config")
flags.declare_key_flag("seed")

log = logging.getLogger("decmem_jax.play")


def bind(port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a busy port is reported at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free; a listening one is not
    try:
        sock.bind((HOST, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise SessionError(f"port {port} on {HOST} is in use (another play server?); pass --port=N, or "
                               f"--port=0 for any free port") from None
        raise SessionError(f"cannot listen on {HOST}:{port}: {e.strerror}") from None
    sock.listen(16)
    return sock


def serve(sock: socket.socket, player) -> None:
    import uvicorn

    from decmem_jax.play.server import create_app

    config = uvicorn.Config(create_app(player), log_level="warning", ws="websockets-sansio", lifespan="off")
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="play: %(message)s")
    from decmem_jax.play.server import Player
    from decmem_jax.rollout.session import WorldModel

    try:
        sock = bind(_PORT.value)
        port = sock.getsockname()[1]
        t0 = time.perf_counter()
        model = WorldModel(rollout_cli._CONFIG.value, steps=_STEPS.value, guidance=_GUIDANCE.value,
                           seed=rollout_cli._SEED.value)
        player = Player(model, world_seed=_WORLD.value, max_chunks=_MAX_CHUNKS.value)
        if _WARMUP.value:
            print("play: compiling (prefill, one chunk, decode; ~1 minute the first time on a 2-core CPU)...",
                  file=sys.stderr, flush=True)
            player.warm_up()
    except SessionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = model.settings
    print(f"play: ready in {time.perf_counter() - t0:.0f} s ({s.steps} {s.solver} steps, guidance {s.guidance}); "
          f"open http://{HOST}:{port}/  (Ctrl-C stops)", flush=True)
    try:
        serve(sock, player)
    except KeyboardInterrupt:
        pass
    finally:
        player.close()
    return 0


def run() -> None:
    flags.FLAGS.set_default("config", DEFAULT_CONFIG)  # the shipped model, from any working directory
    app.run(main)


if __name__ == "__main__":
    run()
