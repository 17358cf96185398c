"""Parallelism applied from outside the model: the device mesh (`mesh.py`) and the logical-axis sharding rules
(`sharding.py`). Model code never mentions devices or mesh axes."""
