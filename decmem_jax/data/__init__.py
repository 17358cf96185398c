"""Data: a procedural block-world generator (writing the WorldMem clip format of `decmem_jax.format`), the CSV index,
the grain input pipeline and the latent cache."""
