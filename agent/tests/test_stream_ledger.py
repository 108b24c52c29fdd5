"""The out-of-band EOF bookkeeping both ends of a parked stream keep (streams.EofLedger): pure logic."""
from __future__ import annotations

from tpenv_agent.streams import EofLedger, eof_line, parse_eof


class Ledger(EofLedger):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.phase = "taken"

    def _give_eof(self) -> None:
        self.calls.append("give")

    def _send_eof(self) -> None:
        self.calls.append("send")

    def _done(self) -> None:
        self.calls.append("done")


def test_an_eof_message_is_passed_on_only_once_joined_and_after_its_bytes():
    # Stage 1: the peer's EOF message overtakes the join (it comes on another path): held.
    led = Ledger()
    led.remote_eof(10)
    assert led.calls == []
    # Stage 2: joined, 4 of its 10 bytes delivered: still held; all 10: passed on, once.
    led.phase = "joined"
    led.received = 4
    led._maybe_eof()
    assert led.calls == []
    led.received = 10
    led._maybe_eof()
    led._maybe_eof()
    led.remote_eof(99)  # a second message changes nothing
    assert led.calls == ["give"]
    # Stage 3: our own side ends: sent once, and the stream is done (both directions ended).
    led.local_eof()
    led.local_eof()
    assert led.calls == ["give", "send", "done"]


def test_done_waits_for_both_directions():
    led = Ledger()
    led.phase = "joined"
    led.local_eof()
    assert led.calls == ["send"]
    led.remote_eof(0)
    assert led.calls == ["send", "give", "done"]


def test_eof_messages_round_trip_and_anything_else_is_ignored():
    assert parse_eof(eof_line(7, 123)) == (7, 123)
    for bad in (b"", b"not json\n", b"[1]\n", b'{"eof": "7", "bytes": 1}\n', b'{"eof": true, "bytes": 1}\n',
                b'{"eof": 7}\n'):
        assert parse_eof(bad) is None, bad
