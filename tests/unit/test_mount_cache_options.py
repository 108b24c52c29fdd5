"""The sshfs options behind the mount's staleness bound (issue 13, docs/design.md "Mounts"): both
cache layers get the same whole-second bound, and 0 turns every cache off."""
from tpenv.engine.mounts import SshfsMount
from tpenv.kits.sshfs import sshfs_cache_options
from tpenv.settings import MountSettings, Settings


def opts(options: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) if "=" in o else (o, "") for o in options)


def test_the_default_caches_a_listing_for_one_second_in_both_layers():
    m = MountSettings()
    o = opts(sshfs_cache_options(m.cache_seconds, m.read_size))
    assert o["dir_cache"] == "yes" and o["dcache_timeout"] == "1"
    assert o["entry_timeout"] == o["attr_timeout"] == "1"
    assert int(o["dcache_max_size"]) >= 100_000  # sshfs's 10000 would evict during a bench-sized listing
    assert o["max_read"] == o["max_write"] == "65536"


def test_zero_asks_the_pod_every_time():
    o = opts(sshfs_cache_options(0, 32768))
    assert o["dir_cache"] == "no" and o["entry_timeout"] == o["attr_timeout"] == "0"
    assert "dcache_timeout" not in o


def test_the_mount_passes_them_to_sshfs():
    s = Settings()
    s.mounts.cache_seconds = 5
    o = opts(SshfsMount(lambda: None, None, name="x", settings=s)._options)
    assert o["dcache_timeout"] == "5" and o["attr_timeout"] == "5" and "passive" in o
