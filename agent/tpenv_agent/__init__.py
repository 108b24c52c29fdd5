"""tpenv-agent: the in-cluster program (sidecar and manager roles)."""
__version__ = "0.1.0"
