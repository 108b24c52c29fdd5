"""Which namespaces the installed webhook serves, as doctor and `tpenv status` read it back from
the MutatingWebhookConfiguration (pure: the object as the API server returns it)."""
from __future__ import annotations

from tpenv.engine.doctor.webhook import _selected
from tpenv.engine.manager import render_manager


def test_the_selection_reads_back_what_install_rendered():
    (cfg,) = [d for d in render_manager({"webhook_namespaces": ["web", "shop"]}, team_mode=False)
              if d["kind"] == "MutatingWebhookConfiguration"]
    assert _selected(cfg) == ["shop", "web"]


def test_no_entry_selects_nothing_and_an_old_exclusion_list_is_not_a_selection():
    assert _selected({"webhooks": []}) == [] and _selected({}) == []
    # An install from before issue 12 (every namespace but a NotIn list) injects almost everywhere:
    # None, so doctor/status do not claim a namespace is left out.
    old = {"webhooks": [{"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["tpenv", "kube-system"]}]}}]}
    assert _selected(old) is None
