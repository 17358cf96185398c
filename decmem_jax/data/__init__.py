"""Data: the WorldMem clip format, a procedural block-world generator, the CSV index, the grain input pipeline and the
latent cache."""
