"""tpenv doctor's rights check against a stub API server that answers each SelfSubjectAccessReview:
which rights are needed (fail), which only degrade a feature (warning naming it and what is then
missing), and the kubectl lines that grant exactly what is missing."""
from __future__ import annotations

import pytest

from tpenv.engine.doctor import FAIL, OK, WARN, run_check
from tpenv.engine.doctor.rights import RIGHTS, _subject_flag, rights


class StubApi:
    """Answers SelfSubjectAccessReviews from a set of refused ``verb resource[/sub]`` and
    SelfSubjectReview with a user name; records every review asked."""

    api = None  # ApiGroup(kube.api, ...) only builds paths; the stub's call never sends them

    def __init__(self, refused: set[str], user: str = "system:serviceaccount:team:dev") -> None:
        self.refused, self.user, self.asked = refused, user, []

    async def call(self, fn, body, *, what):
        if body["kind"] == "SelfSubjectReview":
            return {"status": {"userInfo": {"username": self.user}}}
        attrs = body["spec"]["resourceAttributes"]
        key = f"{attrs['verb']} {attrs['resource']}" + (f"/{attrs['subresource']}" if "subresource" in attrs else "")
        self.asked.append((key, attrs["group"], attrs["namespace"]))
        return {"status": {"allowed": key not in self.refused}}


# --- stage 1: the table covers what the verbs really call ----------------------------------------------------------

def test_the_table_asks_patch_exec_and_the_secrets_replace_uses():
    names = {r.name: r for r in RIGHTS}
    assert len(names) == len(RIGHTS)  # one review per right
    assert names["create pods/portforward"].feature is None
    assert names["update deployments"].feature is None
    assert names["create pods/exec"].feature == "the app's own environment"
    for right in ("patch deployments", "patch statefulsets", "patch secrets", "create serviceaccounts/token",
                  "create roles", "create rolebindings"):
        assert "--replace" in names[right].feature, right
    assert "uninstall" in names["delete secrets"].feature
    assert all(r.then for r in RIGHTS if r.feature), "every degraded feature says what is then missing"


# --- stage 2: every right given -------------------------------------------------------------------------------------

async def test_all_rights_given_is_ok_and_asks_each_once_in_the_namespace():
    api = StubApi(refused=set())
    found = await run_check("cluster/rights", rights(api, "team"))
    assert found.status == OK and f"{len(RIGHTS)} rights" in found.detail
    assert sorted(a[0] for a in api.asked) == sorted(r.name for r in RIGHTS)
    assert {a[2] for a in api.asked} == {"team"}
    assert ("watch endpointslices", "discovery.k8s.io", "team") in api.asked


# --- stage 3: a needed right missing fails; the degraded features ride along as warnings --------------------------

async def test_missing_portforward_fails_and_missing_exec_is_named_as_a_warning():
    api = StubApi(refused={"create pods/portforward", "create pods/exec"})
    found = await run_check("cluster/rights", rights(api, "team"))
    assert found.status == FAIL
    assert "system:serviceaccount:team:dev may not, in namespace 'team': create pods/portforward" in found.detail
    assert ("warning: without create pods/exec, the app's own environment is unavailable: variables the app's "
            "image sets") in found.detail
    assert "get pods" not in found.detail  # only what is missing
    assert found.fix.startswith("kubectl create role tpenv-create -n team --verb=create "
                                "--resource=pods/portforward,pods/exec && kubectl create rolebinding tpenv-create "
                                "-n team --role=tpenv-create --serviceaccount=team:dev")


@pytest.mark.parametrize("refused,feature", [
    ({"create pods/exec"}, "the app's own environment"),
    ({"patch deployments", "create serviceaccounts/token"}, "`tpenv intercept --replace`"),
    ({"delete replicasets"}, "`tpenv uninstall`'s cleanup"),
    ({"update statefulsets"}, "intercepting StatefulSets"),
])
async def test_only_a_feature_missing_is_a_warning_naming_it(refused, feature):
    api = StubApi(refused=refused, user="alice")
    found = await run_check("cluster/rights", rights(api, "team"))
    assert found.status == WARN, found.detail
    assert found.detail.startswith("alice, in namespace 'team': warning: without ")
    assert f"{feature} is unavailable: " in found.detail
    assert all(r in found.detail for r in refused)
    assert "--user=alice" in found.fix


async def test_the_grant_is_one_role_per_verb_so_nothing_more_is_granted():
    api = StubApi(refused={"watch pods", "create pods/portforward", "update deployments"})
    found = await run_check("cluster/rights", rights(api, "team"))
    assert found.status == FAIL
    assert "--verb=watch --resource=pods " in found.fix
    assert "--verb=create --resource=pods/portforward " in found.fix
    assert "--verb=update --resource=deployments.apps " in found.fix


def test_rolebinding_subject():
    assert _subject_flag("system:serviceaccount:team:dev") == "--serviceaccount=team:dev"
    assert _subject_flag("alice") == "--user=alice"
    assert _subject_flag(None) == "--user=YOUR-USER"
