"""Doctor's check of the current user's rights: one SelfSubjectAccessReview per (verb, resource)
tpenv uses in the workload's namespace, so the answer is the API server's own RBAC decision for
exactly this user (impersonation and ServiceAccount tokens included).

Each right is either *needed* (``tpenv intercept`` / ``up`` cannot work without it: the check
fails) or *degrades a feature* (the verbs work, one feature does not: a warning naming the
feature and what is then missing). The table is what the code really calls (``What(...)`` in
engine/ and kits/): patch mode updates the workload and the Service; reading the app's own env
execs in its container (engine/appenv.py); ``--replace`` patches the workload back and makes the
restore right (engine/replace.py, templates/replace/restore.yaml.j2); ``uninstall`` deletes
tpenv-auth and the agent's rollout history.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from tpenv.engine.doctor import FAIL, OK, WARN, Check, Outcome
from tpenv.errors import TpenvError
from tpenv.kits.kube import Kube, What
from tpenv.kits.kuberest import ApiGroup


@dataclass(frozen=True)
class Right:
    verb: str
    group: str
    resource: str
    sub: str
    why: str  # what tpenv does with it
    feature: str | None = None  # None: needed by intercept/up; else the feature lost without it
    then: str = ""  # what is missing without it (features only)

    @property
    def name(self) -> str:
        return f"{self.verb} {self.resource}{'/' + self.sub if self.sub else ''}"

    @property
    def kubectl_resource(self) -> str:
        return (f"{self.resource}.{self.group}" if self.group else self.resource) + (f"/{self.sub}" if self.sub else "")


def _right(verb: str, resource: str, why: str, feature: str | None = None, then: str = "") -> Right:
    """A right from kubectl's way of naming it: ``resource[.group][/subresource]``."""
    resource, _, sub = resource.partition("/")
    resource, _, group = resource.partition(".")
    return Right(verb, group, resource, sub, why, feature, then)


# Needed by `tpenv intercept` / `up`: (verb, resource as kubectl names it, what tpenv does with it).
_NEEDED = (
    ("get", "pods", "see the workload's pods"),
    ("list", "pods", "find the workload's pods"),
    ("watch", "pods", "follow pod restarts"),
    ("create", "pods/portforward", "reach the agent (its SSH listens on the pod's loopback)"),
    ("get", "services", "read the intercepted Service"),
    ("list", "services", "find the Service of the workload"),
    ("update", "services", "point a numeric targetPort at the agent"),
    ("watch", "endpointslices.discovery.k8s.io", "know when the Service routes to the agent"),
    ("get", "secrets", "read the agent's auth Secret tpenv-auth"),
    ("create", "secrets", "create tpenv-auth on first use"),
    ("get", "deployments.apps", "read the workload"),
    ("update", "deployments.apps", "inject the agent (patch mode)"),
    ("list", "replicasets.apps", "find a workload's pods and old revisions"),
)

# Features: a missing right is a warning naming the feature and what is then missing.
# feature -> (what stops working without it, its rights as in _NEEDED)
_FEATURES = {
    "the app's own environment": (
        "variables the app's image sets (ENV in its Dockerfile, e.g. LANG, PATH) are missing from the env "
        "tpenv gives the handler",
        [("create", "pods/exec", "read the app's environment in its container")]),
    "intercepting StatefulSets": (
        "their agent cannot be injected (Deployments are not affected)",
        [("update", "statefulsets.apps", "inject the agent into StatefulSets")]),
    "the admission check of the in-pod redirect": (
        "tpenv assumes admission takes the redirect's init container; if it does not, the rollout stalls and "
        "tpenv restores the workload instead of falling back up front",
        [("create", "pods", "dry-run the in-pod redirect's init container before injecting")]),
    "the in-pod redirect without an init container": (
        "tpenv installs the redirect with an init container instead, which holds each injected pod's app "
        "back about one kubelet cycle (1 s)",
        [("patch", "pods/ephemeralcontainers", "add the redirect to each running pod (setting agent.redirect_via)")]),
    "`tpenv intercept --replace`": (
        "replace mode is refused or cannot put the app back (patch mode, the default, still works)",
        [("patch", "deployments.apps", "put the app back when a replace ends"),
         ("patch", "statefulsets.apps", "put a StatefulSet's app back when a replace ends"),
         ("create", "serviceaccounts", "the restore right's ServiceAccount"),
         ("create", "serviceaccounts/token", "the restore right's token"),
         ("create", "roles.rbac.authorization.k8s.io", "the restore right's Role"),
         ("create", "rolebindings.rbac.authorization.k8s.io", "the restore right's RoleBinding"),
         ("get", "configmaps", "the cluster CA (kube-root-ca.crt) the restore right uses"),
         ("patch", "secrets", "store the restore right's token")]),
    "`tpenv uninstall`'s cleanup": (
        "uninstall restores the workload, then stops with an error before deleting what tpenv left "
        "(old ReplicaSets/ControllerRevisions carrying the agent, the tpenv-auth Secret)",
        [("delete", "secrets", "delete tpenv-auth at uninstall and the restore Secret after a replace"),
         ("delete", "replicasets.apps", "delete a Deployment's old revisions carrying the agent"),
         ("delete", "controllerrevisions.apps", "delete a StatefulSet's old revisions carrying the agent")]),
}

RIGHTS = (*(_right(*row) for row in _NEEDED),
          *(_right(*row, feature, then) for feature, (then, rows) in _FEATURES.items() for row in rows))


def _authz(kube: Kube) -> ApiGroup:
    return ApiGroup(kube.api, "/apis/authorization.k8s.io/v1")


async def whoami(kube: Kube) -> str | None:
    """The user name the API server sees (SelfSubjectReview), or None where it is not served."""
    try:
        review = await kube.call(ApiGroup(kube.api, "/apis/authentication.k8s.io/v1").create_self_subject_review,
                                 {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
                                 what=What("create", "selfsubjectreviews"))
    except TpenvError:
        return None
    return ((review.get("status") or {}).get("userInfo") or {}).get("username")


async def can_i(kube: Kube, namespace: str, verb: str, group: str, resource: str, sub: str = "") -> bool:
    attrs = {"namespace": namespace, "verb": verb, "group": group, "resource": resource}
    if sub:
        attrs["subresource"] = sub
    review = await kube.call(_authz(kube).create_self_subject_access_review,
                             {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                              "spec": {"resourceAttributes": attrs}},
                             what=What("create", "selfsubjectaccessreviews"))
    return bool((review.get("status") or {}).get("allowed"))


def _subject_flag(user: str | None) -> str:
    if user and user.startswith("system:serviceaccount:"):
        _, _, ns, name = user.split(":", 3)
        return f"--serviceaccount={ns}:{name}"
    return f"--user={user or 'YOUR-USER'}"


def grant_command(namespace: str, missing: list[Right], user: str | None) -> str:
    """kubectl lines granting exactly ``missing``: one Role per verb (``kubectl create role``
    grants every verb on every resource given, so one Role for all would grant more than asked)."""
    verbs: dict[str, list[str]] = {}
    for r in missing:
        verbs.setdefault(r.verb, []).append(r.kubectl_resource)
    lines = []
    for verb, resources in verbs.items():
        lines.append(f"kubectl create role tpenv-{verb} -n {namespace} --verb={verb} "
                     f"--resource={','.join(dict.fromkeys(resources))} && kubectl create rolebinding tpenv-{verb} "
                     f"-n {namespace} --role=tpenv-{verb} {_subject_flag(user)}")
    return " && ".join(lines) + "   (run by a cluster admin)"


def judge(namespace: str, answers: list[bool], user: str | None) -> Outcome:
    """The outcome for ``answers`` (one per :data:`RIGHTS`, in order): pure, unit-tested."""
    missing = [r for r, ok in zip(RIGHTS, answers) if not ok]
    if not missing:
        return Outcome(OK, f"{len(RIGHTS)} rights in namespace {namespace!r}: " + ", ".join(r.name for r in RIGHTS))
    needed = [r for r in missing if r.feature is None]
    features: dict[str, list[Right]] = {}
    for r in missing:
        if r.feature is not None:
            features.setdefault(r.feature, []).append(r)
    parts = []
    if needed:
        parts.append(f"{user or 'you'} may not, in namespace {namespace!r}: "
                     + "; ".join(f"{r.name} ({r.why})" for r in needed))
    for feature, rs in features.items():
        parts.append(f"warning: without {', '.join(r.name for r in rs)}, {feature} is unavailable: {rs[0].then}")
    if not needed:
        parts[0] = f"{user or 'you'}, in namespace {namespace!r}: {parts[0]}"
    return Outcome(FAIL if needed else WARN, "; ".join(parts), fix=grant_command(namespace, missing, user))


def rights(kube: Kube, namespace: str) -> Check:
    async def check() -> Outcome:
        answers = await asyncio.gather(*(can_i(kube, namespace, r.verb, r.group, r.resource, r.sub)
                                         for r in RIGHTS))
        user = None if all(answers) else await whoami(kube)
        return judge(namespace, list(answers), user)
    return check
