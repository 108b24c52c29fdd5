"""How tpenv's SSH connections carry data: one place for both ends (the agent's servers and
the client, which imports this module; it imports nothing heavy)."""
from __future__ import annotations

from typing import Any

# The SSH data path (docs/design.md "The tunnel's data path", issue 13), the same on both ends.
# AES-GCM first: one AEAD call per packet on AES-NI, where asyncssh does chacha20-poly1305 as
# three calls and a new Cipher object per packet (1.75 against 3.3 CPU s per GB on loopback);
# chacha stays offered for a peer without AES. Channels advertise 128 KiB packets (asyncssh's
# default is 32 KiB: four times the per-packet Python, WebSocket frames and writes on every hop;
# above 128 KiB asyncssh's receive path gets slower again, measured) and a 1 MiB window
# (default 2 MiB). The window bounds how much of one bulk channel sits in the buffers between the
# two ends (TLS, API server, kubelet, containerd), which is what a small answer on another channel
# of the same tunnel waits behind: about window / throughput. Measured back to back (03:37-03:41,
# docs/performance.md): 1 MiB moved the most bulk for the least CPU per GB; 512 KiB shortened
# that wait's p99 by an eighth and lost a fifth of the download rate; asyncssh's defaults were
# the worst on every figure.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com")
MAX_PACKET = 128 * 1024
CHANNEL_WINDOW = 1024 * 1024
CHANNEL_OPTIONS: dict[str, Any] = {"window": CHANNEL_WINDOW, "max_pktsize": MAX_PACKET}
