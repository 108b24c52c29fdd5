"""tpenv.engine.reconciler.plan: the diff step, a plain function, exhaustively."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpenv.engine.plan import DependencyCycle, plan


@dataclass(frozen=True)
class S:  # a fake spec/unit: the diff only reads these two attributes
    spec_hash: str = "h"
    depends_on: frozenset = frozenset()


def deps(*keys):
    return frozenset(keys)


T = ("tunnel", "ns", "pod-1")
I = ("intercept", "ns", "web", 8080)
H = ("handler", "web")
F = ("forward", "db")

# --- stage 1: single units ----------------------------------------------------------------


def test_nothing_running_everything_starts():
    p = plan({F: S(), H: S()}, {})
    assert sorted(p.start) == sorted([F, H]) and p.stop == [] and p.keep == []
    assert p.why[F] == "new"


def test_unchanged_is_kept_and_plan_is_empty():
    p = plan({F: S("a")}, {F: S("a")})
    assert p.keep == [F] and p.empty


def test_changed_spec_hash_stops_then_starts():
    p = plan({F: S("b")}, {F: S("a")})
    assert p.stop == [F] and p.start == [F] and p.keep == [] and p.why[F] == "changed"


def test_removed_is_stopped_only():
    p = plan({}, {F: S()})
    assert p.stop == [F] and p.start == [] and p.why[F] == "removed"


def test_restart_request_restarts_an_unchanged_unit():
    p = plan({F: S(), H: S()}, {F: S(), H: S()}, restart=[F])
    assert p.stop == [F] and p.start == [F] and p.keep == [H] and p.why[F] == "failed"


def test_restart_request_for_an_unknown_key_is_ignored():
    p = plan({F: S()}, {F: S()}, restart=[("forward", "gone")])
    assert p.empty


# --- stage 2: dependencies ----------------------------------------------------------------


def chain():
    # handler <- intercept <- tunnel: the intercept needs the tunnel, the handler needs nothing
    return {T: S("t"), I: S("i", deps(T)), H: S("h")}


def test_start_order_is_dependencies_first():
    p = plan(chain(), {})
    assert p.start.index(T) < p.start.index(I)
    # independent units share a wave: they may start concurrently
    assert any(T in w and H in w for w in p.start_waves)


def test_restarted_dependency_stops_dependents_first_and_restarts_them_after():
    desired = chain()
    actual = dict(chain())
    desired[T] = S("t2")
    p = plan(desired, actual)
    assert p.stop == [I, T]
    assert p.start == [T, I]
    assert p.keep == [H]
    assert "restarts" in p.why[I]


def test_removed_dependency_stops_dependent_which_then_waits_in_start():
    desired = {I: S("i", deps(T)), H: S("h")}
    p = plan(desired, chain())
    assert p.stop == [I, T]
    assert p.start == [I]  # the loop holds it pending until its dependency runs again
    assert "removed" in p.why[I]


def test_transitive_dependents_are_cascaded():
    a, b, c = ("a",), ("b",), ("c",)
    specs = {a: S(), b: S(depends_on=deps(a)), c: S(depends_on=deps(b))}
    p = plan({**specs, a: S("new")}, specs)
    assert p.stop == [c, b, a] and p.start == [a, b, c]
    assert p.stop_waves == [[c], [b], [a]]


def test_changed_dependent_does_not_restart_its_dependency():
    desired = chain()
    desired[I] = S("i2", deps(T))
    p = plan(desired, chain())
    assert p.stop == [I] and p.start == [I] and sorted(p.keep) == sorted([T, H])


def test_dependency_on_an_undesired_key_is_not_an_error():
    p = plan({I: S("i", deps(T))}, {})
    assert p.start == [I]


def test_mixed_key_part_types_sort_stably():
    a, b = ("forward", "x"), ("forward", 3)
    assert plan({a: S(), b: S()}, {}).start == plan({b: S(), a: S()}, {}).start


# --- stage 3: cycles are rejected -----------------------------------------------------------


def test_cycle_is_rejected_with_the_units_named():
    a, b = ("a",), ("b",)
    with pytest.raises(DependencyCycle, match="a.*b"):
        plan({a: S(depends_on=deps(b)), b: S(depends_on=deps(a))}, {})


def test_self_dependency_is_rejected():
    with pytest.raises(DependencyCycle, match="itself"):
        plan({F: S(depends_on=deps(F))}, {})


def test_cycle_is_rejected_even_when_nothing_would_change():
    a, b = ("a",), ("b",)
    # actual can never hold a cycle, but an unchanged desired set still must be checked
    specs = {a: S(depends_on=deps(b)), b: S()}
    bad = {a: S(depends_on=deps(b)), b: S(depends_on=deps(a))}
    with pytest.raises(DependencyCycle):
        plan(bad, specs)


# --- stage 4: properties over random graphs ---------------------------------------------------

KEYS = [("u", i) for i in range(6)]


@st.composite
def graphs(draw):
    """A random acyclic desired set (edges only to lower indices) and a random running set."""
    def one():
        present = draw(st.lists(st.sampled_from(KEYS), unique=True))
        out = {}
        for k in present:
            lower = [j for j in KEYS if j[1] < k[1]]
            d = draw(st.lists(st.sampled_from(lower), unique=True)) if lower else []
            out[k] = S(draw(st.sampled_from("ab")), frozenset(d))
        return out

    return one(), one(), draw(st.lists(st.sampled_from(KEYS), unique=True))


@settings(max_examples=300, deadline=None)
@given(graphs())
def test_plan_properties(g):
    desired, actual, restart = g
    p = plan(desired, actual, restart)
    # partitions: every running unit is either kept or stopped; every desired one kept or started
    assert set(p.keep) | set(p.stop) == set(actual) and not set(p.keep) & set(p.stop)
    assert set(p.keep) | set(p.start) == set(desired) and not set(p.keep) & set(p.start)
    # kept units are unchanged, and none of their running dependencies is stopped
    for k in p.keep:
        assert desired[k].spec_hash == actual[k].spec_hash
        assert not (actual[k].depends_on & set(p.stop))
    # order: a dependency stops after and starts before its dependents
    for k in p.stop:
        for d in actual[k].depends_on:
            if d in p.stop:
                assert p.stop.index(d) > p.stop.index(k)
    for k in p.start:
        for d in desired[k].depends_on:
            if d in p.start:
                assert p.start.index(d) < p.start.index(k)
    # waves flatten to the lists
    assert [k for w in p.start_waves for k in w] == p.start
    assert [k for w in p.stop_waves for k in w] == p.stop
