"""Drifting Policy on Push-T: environment (env.py), demonstrations (demos.py), network and policy (model.py),
training (train.py) and Diffusion Policy's evaluation protocol (evaluate.py).

Needs the `policy` extra: pip install "pymunk>=6.6,<7" shapely gymnasium opencv-python-headless pygame zarr, then
pip install --no-deps gym-pusht. Nothing here is imported by `drifting/__init__.py`, so the core stays usable without it.
"""
