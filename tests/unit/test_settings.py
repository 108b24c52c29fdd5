"""Settings: the defaults others build on, and TPENV_<SECTION>_<FIELD> overrides."""
from pathlib import Path

import pytest

from tpenv.errors import UsageError
from tpenv.settings import Settings, env_overrides, load_settings


# --- stage 1: defaults ---------------------------------------------------------------------------------------------

def test_defaults():
    s = load_settings({})
    assert (s.agent.image, s.agent.image_pull_policy, s.agent.ssh_port, s.agent.health_port, s.agent.first_port,
            s.agent.lease_seconds) == ("tpenv/agent:dev", "IfNotPresent", 7922, 7921, 7900, 5.0)
    assert (s.tunnels.connect_timeout, s.tunnels.keepalive_interval, s.tunnels.retry_initial,
            s.tunnels.retry_max) == (10.0, 2.0, 0.5, 10.0)
    assert (s.handlers.stop_grace, s.handlers.term_grace, s.handlers.restart_initial, s.handlers.restart_max,
            s.handlers.debounce) == (3.0, 2.0, 0.5, 30.0, 0.2)
    assert (s.kube.request_timeout, s.kube.rollout_timeout) == (15.0, 120.0)
    assert s.session.state_dir == Path.home() / ".cache" / "tpenv" / "sessions"


def test_every_setting_is_documented():
    for var, _section, _name, _default, description in env_overrides():
        assert description.endswith("."), var


# --- stage 2: environment overrides -------------------------------------------------------------------------------

def test_overrides_are_typed():
    s = load_settings({"TPENV_AGENT_IMAGE": "reg/agent:1", "TPENV_AGENT_SSH_PORT": "2222",
                       "TPENV_TUNNELS_RETRY_MAX": "3.5", "TPENV_SESSION_STATE_DIR": "~/x", "TPENV_E2E": "1"})
    assert (s.agent.image, s.agent.ssh_port, s.tunnels.retry_max) == ("reg/agent:1", 2222, 3.5)
    assert s.session.state_dir == Path.home() / "x"


def test_every_field_has_its_variable():
    names = [var for var, *_ in env_overrides()]
    assert "TPENV_AGENT_IMAGE" in names and "TPENV_HANDLERS_DEBOUNCE" in names
    assert len(names) == sum(len(f.annotation.model_fields) for f in Settings.model_fields.values())


@pytest.mark.parametrize("env,message", [
    ({"TPENV_AGENT_SSH_PORT": "abc"},
     "TPENV_AGENT_SSH_PORT='abc': input should be a valid integer, unable to parse string as an integer"),
    ({"TPENV_AGENT_SSH_PORT": "70000"}, "TPENV_AGENT_SSH_PORT='70000': input should be less than or equal to 65535"),
    ({"TPENV_AGENT_IMAG": "x"}, "unknown setting TPENV_AGENT_IMAG (did you mean TPENV_AGENT_IMAGE?)"),
])
def test_bad_overrides(env, message):
    with pytest.raises(UsageError) as info:
        load_settings(env)
    assert info.value.message == message and info.value.exit_code == 2
