"""The handler's env: the pod's, with this machine's PATH, HOME... (tpenv/engine/localenv.py)."""
from tpenv.engine.localenv import command_env


def test_the_pods_home_and_path_give_way_to_this_machines():
    # Stage 1: the charts' uid 1001 has HOME=/ in the pod; the laptop's values win.
    pod = {"HOME": "/", "PATH": "/pod/bin", "WORDPRESS_DB_HOST": "mariadb", "TMPDIR": "/pod/tmp"}
    env = command_env(pod, local={"HOME": "/home/dev", "PATH": "/usr/bin"})
    assert env == {"HOME": "/home/dev", "PATH": "/usr/bin", "WORDPRESS_DB_HOST": "mariadb"}  # TMPDIR: none here


def test_a_name_the_config_sets_is_kept_as_given():
    # Stage 2: `env.set: {HOME: /srv}` is the user's choice, not the pod's accident.
    env = command_env({"HOME": "/srv", "PATH": "/pod/bin"}, explicit={"HOME"}, local={"HOME": "/root", "PATH": "/b"})
    assert env == {"HOME": "/srv", "PATH": "/b"}
