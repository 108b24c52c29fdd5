"""tpenv-agent: the in-cluster program (sidecar and manager roles)."""
