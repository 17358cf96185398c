"""Teacher-forced SGM retrieval of a stage-3 checkpoint at several clip lengths (the training objective's held-out
metrics: flow loss, retrieval cross-entropy, top-1), to see whether retrieval learnt on short clips holds on longer
histories. docs/memory.md, "Reading (H200 run)", used it on CPU:

    JAX_PLATFORMS=cpu python scripts/retrieval_by_length.py LATENTS.csv 60,120,196

LATENTS.csv: clips encoded by `decmem_jax.data.encode_latents --all-frames` (with their poses), at least as long as
the longest length. Each length is scored on the CSV's first --batch clips under --seeds noise seeds."""

import argparse

import jax
import numpy as np

from decmem_jax.parallel import mesh as mesh_lib
from decmem_jax.rollout.session import load_config
from decmem_jax.train import checkpoint as ckpt_lib
from decmem_jax.train import data as data_lib
from decmem_jax.train import loop
from decmem_jax.train import state as state_lib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="latents.csv from decmem_jax.data.encode_latents")
    p.add_argument("lengths", help="comma-separated clip lengths in latents (multiples of the chunk)")
    p.add_argument("--config", default="configs/world_tiny.py:decmem")
    p.add_argument("--weights", default="weights/world_tiny/decmem")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    for n in (int(x) for x in a.lengths.split(",")):
        cfg = load_config(a.config)
        with cfg.unlocked():
            cfg.data.csv = cfg.data.eval_csv = a.csv
            cfg.data.clip_latents, cfg.train.batch, cfg.init_from = n, a.batch, a.weights
            cfg.data.cache_latents, cfg.data.num_threads, cfg.data.prefetch = False, 1, 1
            cfg.mesh = {k: 1 for k in cfg.mesh}
        setup = loop.build(cfg, mesh_lib.make_mesh(dict(cfg.mesh)))
        state = ckpt_lib.load_init_params(cfg.init_from, setup.fresh_state(), setup.shardings)
        batch = {k: jax.numpy.asarray(v) for k, v in next(data_lib.Batches(cfg))[0].items()}
        res: dict[str, list[float]] = {}
        for seed in range(a.seeds):
            evaluate = loop.make_eval(setup.graphdef, state_lib.objective(cfg), seed)
            for k, v in evaluate(state.params, batch, setup.context).items():
                res.setdefault(k, []).append(float(v))
        print(f"{n} latents: " + ", ".join(f"{k[5:]} {np.mean(v):.3f} (seeds {', '.join(f'{x:.3f}' for x in v)})"
                                           for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
