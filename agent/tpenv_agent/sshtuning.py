"""How tpenv's SSH connections carry data: one place for both ends (the agent's servers and
the client, which imports this module; it imports nothing heavy)."""
from __future__ import annotations

from typing import Any

# The SSH data path (docs/design.md "The tunnel's data path", issue 13), the same on both ends.
# AES-GCM first: one AEAD call per packet on AES-NI, where asyncssh does chacha20-poly1305 as
# three calls and a new Cipher object per packet (1.75 against 3.3 CPU s per GB on loopback);
# chacha stays offered for a peer without AES. Channels advertise 128 KiB packets (asyncssh's
# default is 32 KiB: four times the per-packet Python, WebSocket frames and writes on every hop;
# above 128 KiB asyncssh's receive path gets slower again, measured) and a 512 KiB window
# (default 2 MiB). The window bounds how much of one bulk channel sits in the buffers between the
# two ends (TLS, API server, kubelet, containerd), which is what a small answer on another channel
# of the same tunnel waits behind: about window / throughput (p50 under a bulk download 6.4 ms
# at 1 MiB, 4.6 at 512 KiB, 2.5 at 256 KiB; bulk 128, 97, 93 MB/s, noisy runs).
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com")
MAX_PACKET = 128 * 1024
CHANNEL_WINDOW = 512 * 1024
CHANNEL_OPTIONS: dict[str, Any] = {"window": CHANNEL_WINDOW, "max_pktsize": MAX_PACKET}
