#!/usr/bin/env python
"""Generated frames per second of `python -m decmem_jax.play` on this machine's CPU with the shipped world-tiny
model, next to the plain rollout CLI measured in the same run (a benchmark, not a timed test).

Cases, all on one held-out clip of the procedural world (world 5, the generator's revisit script; 33 context frames,
then --chunks chunks of 16 frames under the clip's own actions), run in --rounds interleaved rounds (the CPU is
shared: interleaving spreads load changes over every case; medians over rounds are reported):

  peer        the rollout CLI: `decmem_jax.rollout.__main__.run`, what `python -m decmem_jax.rollout
              --config=configs/world_tiny.py:decmem` (scripts/main.sh) calls, in this process: 10 UniPC steps, action
              CFG 2.0, 4 chunks per lax.scan call, the VAE decoding 16 latents at a time. Per-chunk time of the
              segments after the first (which compiles), from its record; PSNR against the clip's true continuation.
  peer+play   the same with play's sampler (rollout.steps/guidance), so the sampler's share of the speed-up is
              separated from the session's (one chunk per call, one latent per decode call).
  session     decmem_jax.rollout.session with play's settings, under the clip's actions: median seconds per chunk
              after the first, frames/s, PSNR against the truth (with peer+play: what play's settings cost).
  play        the play server itself (uvicorn on 127.0.0.1, in this process) and a WebSocket client holding W, as a
              page would, for half as many chunks: frames received per second of wall time (PNG encoding, the truth
              render and the WebSocket included) and the server's seconds per chunk.

    python benchmarks/play_fps.py                       # writes docs/results/<date>_play_fps_cpu.json
    python benchmarks/play_fps.py --rounds 1 --json out/play_fps.json

Only compare numbers from one run: the CPU here is shared, so the load average is recorded next to them. The peer
reads the clip back from its MPEG-4 file (quantizer 1) as the CLI does, the session gets the rendered frames: their
PSNRs differ by that too, not only by the sampler.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from benchmarks.common import jax_info, write_record  # noqa: E402

CONFIG = "configs/world_tiny.py:decmem"
WORLD = 5


def write_clip(clip, folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The clip as the rollout CLI reads it: an mp4 (the generator's lossless-ish MPEG-4 settings) and an npz."""
    from decmem_jax import video
    from decmem_jax.data.generate_world import video_options

    mp4, npz = folder / "clip.mp4", folder / "clip.npz"
    video.write_video(mp4, clip.frames, fps=10, **video_options(1))
    np.savez_compressed(npz, actions=clip.actions, poses=clip.poses)
    return mp4, npz


def run_peer(config, mp4, npz, frames: int, folder: pathlib.Path, name: str) -> dict:
    """The rollout CLI's own `run` (what `python -m decmem_jax.rollout` calls), in this process."""
    from decmem_jax.rollout import __main__ as rollout_cli

    t0 = time.perf_counter()
    rec = rollout_cli.run(config, context=str(mp4), actions=str(npz), num_frames=frames, out=str(folder / f"{name}.mp4"),
                          ground_truth=str(mp4))
    t = rec["timing"]
    print(f"[{name}] {16 / t['fps_excluding_compile']:.2f} s/chunk after the first segment", flush=True)
    return dict(steps=rec["rollout"]["steps"], guidance=rec["rollout"]["guidance"],
                s_per_chunk=round(16 / t["fps_excluding_compile"], 3), fps=round(t["fps_excluding_compile"], 2),
                first_segment_s_per_chunk=round(t["per_chunk_s_first_segment"], 2),
                psnr=round(rec["metrics"]["psnr"], 2), baseline_psnr=round(rec["baseline_metrics"]["psnr"], 2),
                wall_s=round(time.perf_counter() - t0, 1))


def run_session(model, clip, context: int, chunks: int) -> dict:
    from decmem_jax.eval import compare

    session = model.session(clip.frames[:context], clip.actions[:context], clip.poses[:context], world=clip.world,
                            max_chunks=chunks)  # the same capacity as play's sessions: one compiled step
    seconds = []
    for i in range(chunks):
        r = session.step(clip.actions[context + 16 * i: context + 16 * (i + 1)])
        seconds.append(r.seconds)
        print(f"[session] chunk {i}: {r.seconds:.2f} s", flush=True)
    truth = clip.frames[context: context + 16 * chunks]
    s = float(np.median(seconds[1:]))
    return dict(s_per_chunk=round(s, 3), fps=round(16 / s, 2), first_chunk_s=round(seconds[0], 2),
                psnr=round(float(compare.per_frame_psnr(session.video[context:], truth).mean()), 2),
                prefill_s=round(session.prefill_seconds, 2))


def run_play(model, chunks: int, max_chunks: int) -> dict:
    """The server in a thread, a WebSocket client here: hold W for `chunks` chunks."""
    import socket

    import uvicorn
    import websockets

    from decmem_jax.play.server import Player, create_app

    player = Player(model, world_seed=WORLD, max_chunks=max_chunks)  # as the session's: one compiled step
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    server = uvicorn.Server(uvicorn.Config(create_app(player), log_level="warning", ws="websockets-sansio",
                                           lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()

    async def client():
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/ws"
        async with websockets.connect(url, max_size=None) as ws:
            while json.loads(await ws.recv())["type"] != "context":
                pass
            await ws.send(json.dumps({"type": "keys", "held": ["KeyW"], "pressed": "KeyW"}))
            t0, frames, reported, first_frame = time.perf_counter(), 0, [], None
            while len(reported) < chunks:
                msg = json.loads(await ws.recv())
                if msg["type"] == "frames":
                    first_frame = first_frame or time.perf_counter() - t0
                    frames += len(msg["frames"])
                elif msg["type"] == "chunk":
                    reported.append(msg["seconds"])
                    print(f"[play] chunk {msg['chunk']}: {msg['seconds']:.2f} s on the server", flush=True)
            wall = time.perf_counter() - t0
            await ws.send(json.dumps({"type": "keys", "held": [], "pressed": None}))
            return frames, wall, reported, first_frame

    frames, wall, reported, first_frame = asyncio.run(client())
    server.should_exit = True
    thread.join(timeout=30)
    player.close()
    return dict(fps=round(frames / wall, 2), frames=frames, wall_s=round(wall, 2),
                first_frames_after_s=round(first_frame, 2),
                server_s_per_chunk_median=round(float(np.median(reported)), 3))


def _median(rounds: list[dict], key: str) -> float:
    return round(float(np.median([r[key] for r in rounds])), 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=8, help="chunks the peer generates (16 frames each; it times whole "
                   "4-chunk segments after the first, so a multiple of 4, at least 8); session and play run half")
    p.add_argument("--rounds", type=int, default=2, help="rounds of all cases, interleaved so that the shared CPU's "
                   "load changes hit every case alike; medians over rounds are reported")
    p.add_argument("--steps", type=int, default=None, help="play's sampler steps (default: play's default)")
    p.add_argument("--guidance", type=float, default=None, help="play's action CFG (default: play's default)")
    p.add_argument("--json", default=None, help="output JSON (default docs/results/<today>_play_fps_cpu.json)")
    args = p.parse_args(argv)
    if args.chunks < 8 or args.chunks % 4:
        p.error("--chunks must be a multiple of 4 and at least 8 (the peer's first 4-chunk segment compiles)")
    os.chdir(ROOT)  # the configs name the shipped weights relative to the repository root

    from decmem_jax.play import __main__ as play_cli
    from decmem_jax.rollout.session import WorldModel, load_config, world_clip

    steps = args.steps or play_cli._STEPS.default
    guidance = args.guidance if args.guidance is not None else play_cli._GUIDANCE.default
    config = load_config(CONFIG)
    fast = load_config(CONFIG)
    fast.rollout.update(steps=steps, guidance=guidance)
    context = int(config.rollout.context_frames)
    frames, short = 16 * args.chunks, args.chunks // 2
    clip = world_clip(WORLD, context + frames, (64, 64), revisit=True)
    record = dict(benchmark="play_fps", date=datetime.date.today().isoformat(), config=CONFIG, world=WORLD,
                  context_frames=context, chunks=args.chunks, rounds=args.rounds, cpu_count=os.cpu_count(),
                  **jax_info(), play_settings=dict(steps=steps, guidance=guidance), loadavg=[])
    model = WorldModel(config, steps=steps, guidance=guidance)
    cases = {"peer": [], "peer_with_play_sampler": [], "session": [], "play": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        mp4, npz = write_clip(clip, folder)
        for r in range(args.rounds):
            print(f"--- round {r + 1}/{args.rounds}", flush=True)
            record["loadavg"].append(round(os.getloadavg()[0], 2))
            cases["peer"].append(run_peer(config, mp4, npz, frames, folder, "peer"))
            cases["peer_with_play_sampler"].append(run_peer(fast, mp4, npz, frames, folder, "peer_play_sampler"))
            cases["session"].append(run_session(model, clip, context, args.chunks))
            cases["play"].append(run_play(model, short, args.chunks))
        record["loadavg"].append(round(os.getloadavg()[0], 2))
    record["rounds_detail"] = cases
    for name in ("peer", "peer_with_play_sampler", "session"):
        rounds = cases[name]
        record[name] = dict(rounds[-1], s_per_chunk=_median(rounds, "s_per_chunk"), fps=_median(rounds, "fps"))
    record["play"] = dict(cases["play"][-1], fps=_median(cases["play"], "fps"),
                          server_s_per_chunk_median=_median(cases["play"], "server_s_per_chunk_median"))

    print(f"\n{'case (median of rounds)':<28}{'steps':>6}{'CFG':>6}{'s/chunk':>10}{'frames/s':>10}{'PSNR dB':>9}")
    peer, pp, se, pl = record["peer"], record["peer_with_play_sampler"], record["session"], record["play"]
    print(f"{'peer: rollout CLI':<28}{peer['steps']:>6}{peer['guidance']:>6}{peer['s_per_chunk']:>10}"
          f"{peer['fps']:>10}{peer['psnr']:>9}")
    print(f"{'rollout CLI, play sampler':<28}{pp['steps']:>6}{pp['guidance']:>6}{pp['s_per_chunk']:>10}"
          f"{pp['fps']:>10}{pp['psnr']:>9}")
    print(f"{'session, play settings':<28}{steps:>6}{guidance:>6}{se['s_per_chunk']:>10}{se['fps']:>10}"
          f"{se['psnr']:>9}")
    print(f"{'play: server + WebSocket':<28}{steps:>6}{guidance:>6}{pl['server_s_per_chunk_median']:>10}"
          f"{pl['fps']:>10}{'':>9}")
    record["play_over_peer_fps"] = round(pl["fps"] / peer["fps"], 2)
    print(f"play/peer frames/s: {record['play_over_peer_fps']}x; copy-last-frame baseline PSNR "
          f"{peer['baseline_psnr']} dB; load average {record['loadavg']} on {os.cpu_count()} cores")
    out = args.json or ROOT / "docs" / "results" / f"{record['date']}_play_fps_cpu.json"
    write_record(out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
