"""Training infrastructure: typed configs, checkpoints, EMA, guards, datasets, exports, preflight, run directories.

Dependencies point one way: training -> models, core (diffusion/*.py); nothing in the core or models imports it."""
from .config import ConfigError, parse_config
from .ema import EMA

__all__ = ["ConfigError", "parse_config", "EMA"]
