"""Local launcher: runs the three stages one after another on this machine (all of its accelerators, one process),
or as N local processes of one multi-process run (to exercise the multi-host path on one machine).

    python launch/local.py --root runs --experiment try1 --wan-ckpt ckpt/wan21 --csv data/latents/latents.csv
    python launch/local.py ... --stages decmem --dry-run                # print the commands only
    python launch/local.py ... -- --config.train.steps=100              # flags after -- go to every stage
    python launch/local.py --config configs/train_tiny.py --root /tmp/r --experiment tiny --wan-ckpt random \
        --csv "" -- --config.data.source=synthetic                     # CPU smoke run of the tiny stages

Commands and workdirs are the XManager launcher's (`launch/specs.py` build_jobs) with the mesh left to the
config (fsdp over all local devices). --processes N adds JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID (read by decmem_jax.parallel.mesh.init_distributed) and starts N copies of each stage (CPU: gloo
collectives; GPUs: --gpus-per-process K gives each process its own K devices). Each process reads its own shard of the
data and writes its own data-iterator state, as on a real multi-host cluster.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch.specs import STAGES, build_jobs, check_stages, process_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def stage_commands(*, root: str, experiment: str, wan_ckpt: str, csv: str, stages=STAGES, config: str | None = None,
                   extra=(), python: str = sys.executable) -> list[tuple[str, list[str]]]:
    """(stage, argv) per requested stage, init_from chained through the previous stage's workdir (the XManager
    launcher's commands with the mesh and batch left to the config)."""
    jobs = build_jobs(None, root=root, experiment=experiment, wan_ckpt=wan_ckpt, csv=csv, stages=stages,
                      global_batch=None, extra_flags=extra, python=python,
                      config=f"{config}:{{stage}}" if config else "configs/{stage}.py")
    return [(job.stage, list(job.command)) for job in jobs]


def run_stage(argv: list[str], processes: int, port: int, gpus_per_process: int = 0) -> int:
    if processes == 1:
        return subprocess.run(argv, cwd=ROOT).returncode
    procs = []
    for i in range(processes):
        env = dict(os.environ, **process_env(i, processes, port, gpus_per_process))
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env))
    codes = [p.wait() for p in procs]
    return max(codes, key=abs)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True)
    p.add_argument("--experiment", required=True)
    p.add_argument("--wan-ckpt", required=True, help="converted Wan2.1 DiT, or 'random'")
    p.add_argument("--csv", required=True, help="latents.csv ('' with --config.data.source=synthetic)")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--config", default=None, help="one config file for every stage, called as FILE:STAGE "
                                                   "(e.g. configs/train_tiny.py); default configs/<stage>.py")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--gpus-per-process", type=int, default=0, help="split local GPUs between the processes "
                                                                    "(CUDA_VISIBLE_DEVICES); 0 = leave as is")
    p.add_argument("--port", type=int, default=12355)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    try:
        stages = check_stages(args.stages.split(","))
    except ValueError as e:
        p.error(str(e))
    for stage, cmd in stage_commands(root=args.root, experiment=args.experiment, wan_ckpt=args.wan_ckpt, csv=args.csv,
                                     stages=stages, config=args.config, extra=extra):
        print(f"# {stage}: {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        code = run_stage(cmd, args.processes, args.port, args.gpus_per_process)
        if code != 0:
            print(f"stage {stage} exited with {code}; later stages not started", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
