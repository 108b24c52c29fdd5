"""Debian packages the cluster needs, installed with apt-get when missing (checked with dpkg -s first)."""
from __future__ import annotations

import os
import subprocess

from proc import say

PACKAGES = ["containerd", "runc", "containernetworking-plugins", "iptables", "conntrack", "iproute2", "openssl"]


def missing(packages: list[str]) -> list[str]:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *packages],
                         capture_output=True, text=True).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    return [p for p in packages if p not in installed]


def ensure(packages: list[str] = PACKAGES) -> None:
    todo = missing(packages)
    if not todo:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"missing Debian packages {' '.join(todo)}: run as root, or `apt-get install {' '.join(todo)}`")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    say(f"installing Debian packages: {' '.join(todo)} (apt-get)")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *todo], check=True, env=env,
                   stdout=subprocess.DEVNULL)
