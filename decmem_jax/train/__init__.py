"""Three-stage teacher-forcing training of the DiT (dense_short -> dense_long -> decmem): `python -m
decmem_jax.train --config=configs/STAGE.py --workdir DIR`. See docs/training.md."""
