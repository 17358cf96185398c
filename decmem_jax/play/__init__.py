"""Interactive play: a local web page that steers the world model with the keyboard (`python -m decmem_jax.play`)."""
