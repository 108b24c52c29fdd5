"""Settings: the defaults others build on, and TPENV_<SECTION>_<FIELD> overrides."""
from pathlib import Path

import pytest

from tpenv.errors import UsageError
from tpenv.settings import Settings, env_overrides, load_settings


# --- stage 1: defaults ---------------------------------------------------------------------------------------------

def test_defaults():
    s = load_settings({})
    assert (s.agent.image, s.agent.image_pull_policy, s.agent.ssh_port,
            s.agent.lease_seconds) == ("tpenv/agent:dev", "IfNotPresent", 7922, 5.0)
    assert (s.tunnels.connect_timeout, s.tunnels.retry_initial, s.tunnels.retry_max) == (10.0, 0.5, 10.0)
    assert (s.handlers.stop_grace, s.handlers.term_grace, s.handlers.restart_initial, s.handlers.restart_max,
            s.handlers.debounce) == (3.0, 2.0, 0.5, 30.0, 0.2)
    assert s.kube.rollout_timeout == 120.0
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


# --- stage 3: every documented setting is read, and shown with its real default ------------------------------------

PACKAGE = Path(__file__).resolve().parents[2] / "tpenv"
TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def test_every_documented_setting_is_read_by_the_code():
    """A setting nobody reads lies to whoever sets it. A read is an attribute access (``.ssh_port``)
    or a getattr by name, anywhere in the package or its templates; a field's declaration
    (``ssh_port: int = Field(...)``) is neither, so settings.py's own methods count, its fields do not."""
    sources = [p.read_text() for base in (PACKAGE, TEMPLATES) for p in base.rglob("*")
               if p.is_file() and p.suffix in (".py", ".j2")]
    import re

    unread = [var for var, _section, name, _default, _description in env_overrides()
              if not any(re.search(rf"\.{name}\b|[\"']{name}[\"']", text) for text in sources)]
    assert unread == [], f"documented settings that no code reads: {unread} (wire them, or remove them)"


def test_help_and_docs_show_real_defaults():
    from tpenv.cli.main import _settings_epilog

    epilog = _settings_epilog()
    assert "PydanticUndefined" not in epilog
    assert "TPENV_MANAGER_RELAY_CIDRS (default empty)" in epilog
    assert "TPENV_AGENT_SSH_PORT (default 7922)" in epilog
    assert "TPENV_SESSION_STATE_DIR (default ~/.cache/tpenv/sessions)" in epilog
    defaults = {var: default for var, _s, _n, default, _d in env_overrides()}
    # Each shown default, given back as the environment, is the default itself (it round-trips).
    assert load_settings(defaults) == load_settings({})


def test_settings_travel_typed_without_private_fallbacks():
    """Settings reach the engine as the typed model: no ``settings: Any``, and no ``if settings is
    None`` branch with numbers of its own (a connect timeout of 15.0 against the setting's 10.0)."""
    import re

    root = Path(__file__).resolve().parents[2] / "tpenv"
    pattern = re.compile(r"settings\w*\s*:\s*Any\b|settings\w* is (not )?None|settings\w* else\b")
    offenders = [f"{p.relative_to(root.parent)}:{n}: {line.strip()}" for p in sorted(root.rglob("*.py"))
                 for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == [], "\n".join(offenders)


def test_kit_and_spec_defaults_are_the_documented_ones():
    # Units built without settings (tests, tools) behave as the documented defaults say.
    from tpenv.engine.forwards import ForwardSpec
    from tpenv.engine.handlers import HandlerSpec
    from tpenv.engine.tunnels import TunnelSpec
    from tpenv.kits import agent_client

    s = Settings()
    tunnel = TunnelSpec.__dataclass_fields__
    assert (tunnel["ssh_port"].default, tunnel["connect_timeout"].default, tunnel["leave_drain"].default) == \
        (s.agent.ssh_port, s.tunnels.connect_timeout, s.tunnels.leave_drain)
    assert ForwardSpec.__dataclass_fields__["connect_timeout"].default == s.tunnels.connect_timeout
    assert (agent_client.SSH_PORT, agent_client.CONNECT_TIMEOUT) == (s.agent.ssh_port, s.tunnels.connect_timeout)
    h = HandlerSpec.__dataclass_fields__
    assert [h[k].default for k in ("stop_grace", "term_grace", "restart_initial", "restart_max", "debounce")] == \
        [s.handlers.stop_grace, s.handlers.term_grace, s.handlers.restart_initial, s.handlers.restart_max,
         s.handlers.debounce]
