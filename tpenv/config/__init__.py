"""telepresence.yaml: the models (models.py), loading with located errors (loader.py), env rendering (env.py),
and `tpenv intercept` flags as the same models (flags.py)."""
from tpenv.config.env import render_env, write_env_file
from tpenv.config.flags import intercept_from_flags
from tpenv.config.loader import load_config
from tpenv.config.models import (Config, Connect, EnvSpec, Forward, Intercept, Match, MountSpec, PortMap, RunSpec,
                                 parse_port)

__all__ = ["Config", "Connect", "EnvSpec", "Forward", "Intercept", "Match", "MountSpec", "PortMap", "RunSpec",
           "intercept_from_flags", "load_config", "parse_port", "render_env", "write_env_file"]
