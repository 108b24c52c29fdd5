"""The registry's match rules and holder rules, as pure functions (no sockets)."""
from __future__ import annotations

import pytest

from tpenv_agent.registry import ControlError, Intercept, Match, PortSpec, Registry


def H(**kv: str) -> dict[bytes, list[bytes]]:
    return {k.replace("_", "-").encode(): [v.encode()] for k, v in kv.items()}


def test_listen_spec_parses_with_and_without_a_name():
    assert PortSpec.parse("7900:8080:http") == PortSpec(7900, 8080, "http")
    assert PortSpec.parse("7900:8080") == PortSpec(7900, 8080, "8080")
    with pytest.raises(ValueError):
        PortSpec.parse("http:8080")


def test_header_regex_must_match_the_whole_value_and_names_ignore_case():
    m = Match({"headers": {"X-Dev": "alice|bob"}})
    assert m.matches(H(x_dev="alice"), b"/")
    assert m.matches(H(x_dev="bob"), b"/")
    assert not m.matches(H(x_dev="alice2"), b"/")
    assert not m.matches({}, b"/")


def test_repeated_header_matches_if_any_value_does():
    m = Match({"headers": {"x-dev": "alice"}})
    assert m.matches({b"x-dev": [b"bob", b"alice"]}, b"/")


def test_path_rules_equal_prefix_regex_ignore_the_query():
    assert Match({"path": {"equal": "/a"}}).matches({}, b"/a?x=1")
    assert not Match({"path": {"equal": "/a"}}).matches({}, b"/ab")
    assert Match({"path": {"prefix": "/api/"}}).matches({}, b"/api/v1")
    assert Match({"path": {"regex": "/u/[0-9]+"}}).matches({}, b"/u/42?x")
    assert not Match({"path": {"regex": "/u/[0-9]+"}}).matches({}, b"/u/42/x")


@pytest.mark.parametrize("spec", [{"headers": {"a": "("}}, {"path": {"regex": "("}}, {"path": {"nope": "/"}},
                                  {"path": "/x"}, {"headers": ["a"]}, "all"])
def test_bad_match_specs_are_bad_requests(spec):
    with pytest.raises(ControlError) as e:
        Match(spec)
    assert e.value.code == "bad-request"


def icpt(reg: Registry, iid: str, match: dict | None, owner: object = None) -> Intercept:
    return Intercept(iid, iid.split(":")[0], reg.ports[0], None if match is None else Match(match),
                     ("tpenv", 1), owner)


def test_routing_checks_header_intercepts_before_the_all_tcp_holder():
    reg = Registry([PortSpec(7900, 8080, "http")])
    port = reg.ports[0]
    assert reg.route_request(port, H(x_dev="a"), b"/") is None
    reg.add(icpt(reg, "all:x", None))
    reg.add(icpt(reg, "a:x", {"headers": {"x-dev": "a"}}))
    assert reg.route_request(port, H(x_dev="a"), b"/").intercept_id == "a:x"
    assert reg.route_request(port, H(x_dev="b"), b"/").intercept_id == "all:x"


def test_conflicts_name_the_holder_and_same_id_replaces():
    reg = Registry([PortSpec(7900, 8080, "http")])
    first = reg.add(icpt(reg, "alice:web", None))
    with pytest.raises(ControlError) as e:
        reg.add(icpt(reg, "bob:web", None))
    assert e.value.code == "conflict" and "alice:web" in e.value.message
    ended = []
    reg.on_end.append(ended.append)
    reg.add(icpt(reg, "alice:web", None))
    assert ended == [first] and first.ended and len(reg.all()) == 1


def test_remove_owned_by_ends_only_that_owners_intercepts():
    reg = Registry([PortSpec(7900, 8080, "http")])
    a, b = object(), object()
    reg.add(icpt(reg, "s1:x", {"headers": {"x": "1"}}, owner=a))
    reg.add(icpt(reg, "s2:x", {"headers": {"x": "2"}}, owner=b))
    assert [i.intercept_id for i in reg.remove_owned_by(a)] == ["s1:x"]
    assert [i.intercept_id for i in reg.all()] == ["s2:x"]
    with pytest.raises(ControlError):
        reg.remove("s1:x")


# --- issue 12: intercepts owned by their user; personal traffic stays personal ------------------

P = PortSpec(7900, 8080, "http")


def held(iid: str, user: str, match: dict | None) -> Intercept:
    session = iid.split(":")[0]
    return Intercept(iid, session, P, None if match is None else Match(match), ("tpenv", 1), owner=object(),
                     user=user, verified=True)


def personal(iid: str) -> dict:
    return {"headers": {"x-telepresence-intercept-id": iid}}


def test_only_the_holder_replaces_or_ends_an_intercept():
    reg = Registry([P])
    reg.add(held("sa:web", "alice", personal("sa:web")))
    # Another user under the same session id (a certificate signed with the shared CA key).
    with pytest.raises(ControlError) as e:
        reg.add(held("sa:web", "bob", None))
    assert e.value.code == "forbidden" and "held by alice" in e.value.message
    with pytest.raises(ControlError) as e:
        reg.remove("sa:web", user="bob")
    assert e.value.code == "forbidden" and "alice" in e.value.message
    assert [i.user for i in reg.all()] == ["alice"]
    # The holder may; a forced replacement (the agent checked the RBAC right) may too.
    reg.add(held("sa:web", "alice", personal("sa:web")))
    reg.add(held("sa:web", "bob", personal("sa:web")), force=True)
    assert reg.remove("sa:web", user="bob").user == "bob"


def test_force_takes_over_a_port_another_user_holds_for_all_tcp_and_never_their_personal_traffic():
    reg = Registry([P])
    ended: list = []
    reg.on_end.append(ended.append)
    alice = reg.add(held("sa:web", "alice", None))
    bobs = held("sb:web", "bob", None)
    assert reg.takes_from_others(bobs)
    with pytest.raises(ControlError) as e:
        reg.add(bobs)
    assert e.value.code == "conflict" and "alice" in e.value.message and "--force" in e.value.message
    # Forced (the agent checked bob's RBAC right): alice's intercept ends, bob's holds the port.
    reg.add(bobs, force=True)
    assert ended == [alice] and [i.intercept_id for i in reg.all()] == ["sb:web"]
    # The same user's second all-TCP intercept is a plain conflict: force is for other users'.
    with pytest.raises(ControlError) as e:
        reg.add(held("sc:web", "bob", None), force=True)
    assert e.value.code == "conflict"
    # Personal traffic stays personal even with force.
    reg.remove("sb:web")
    reg.add(held("sa:web", "alice", personal("sa:web")))
    assert not reg.takes_from_others(held("sb:web", "bob", personal(".*")))
    with pytest.raises(ControlError):
        reg.add(held("sb:web", "bob", personal(".*")), force=True)


def test_a_rule_taking_another_users_personal_header_is_refused_naming_the_holder():
    reg = Registry([P])
    reg.add(held("sa:web", "alice", personal("sa:web")))
    for broad in (".*", "sa:.*", "s.:web"):
        with pytest.raises(ControlError) as e:
            reg.add(held("sb:web", "bob", personal(broad)))
        assert e.value.code == "conflict" and "alice" in e.value.message and "sa:web" in e.value.message
    # Bob's own personal intercept sits beside Alice's; each gets only its own header's traffic.
    reg.add(held("sb:web", "bob", personal("sb:web")))
    assert reg.route_request(P, H(x_telepresence_intercept_id="sa:web"), b"/").user == "alice"
    assert reg.route_request(P, H(x_telepresence_intercept_id="sb:web"), b"/").user == "bob"
    assert reg.route_request(P, {}, b"/") is None


def test_personal_traffic_goes_to_its_intercept_even_behind_an_earlier_broad_rule():
    reg = Registry([P])
    reg.add(held("sb:any", "bob", {"path": {"prefix": "/"}}))  # registered first, takes everything
    reg.add(held("sa:web", "alice", personal("sa:web")))
    assert reg.route_request(P, H(x_telepresence_intercept_id="sa:web"), b"/x").user == "alice"
    assert reg.route_request(P, {}, b"/x").user == "bob"


def test_patterns_are_linear_time_re2():
    # (a+)+$ backtracks exponentially in Python's re; RE2 answers at once.
    m = Match({"headers": {"x-dev": "(a+)+$"}, "path": {"regex": "(x+x+)+y"}})
    assert not m.matches(H(x_dev="a" * 50_000 + "!"), b"/" + b"x" * 50_000)
    with pytest.raises(ControlError) as e:
        Match({"headers": {"x-dev": "(a)\\1"}})  # a backreference: not RE2
    assert e.value.code == "bad-request" and "RE2" in e.value.message


def test_a_rule_without_operators_is_matched_as_its_text_exactly_as_re2_would():
    import re

    import re2

    from tpenv_agent.registry import Literal, compile_rule, literal_text

    def re2_says(pattern: str, value: str) -> bool:
        return re2.fullmatch(pattern, value) is not None

    # Stage 1: what re.escape writes (the personal header's rule) and plain values are literals.
    ids = ["laptop-3f2a:api", "a.b c#d&e~f", "x_y/z@1", "café", "s1:copy", "yes", ""]
    patterns = [re.escape(i) for i in ids] + ["yes", "alice", "team-a"]
    patterns += ["\\" + chr(i) for i in range(128) if not chr(i).isalnum()]
    for pattern in patterns:
        rule = compile_rule(pattern, "test")
        assert isinstance(rule, Literal), pattern
        text = rule.text
        # Stage 2: on the literal itself, near misses and other values, equality and RE2 agree.
        for value in {text, text + "x", text[:-1], text.upper(), "x" + text, "", "yes", "alice", "a\nb"}:
            assert bool(rule.fullmatch(value)) == re2_says(pattern, value), (pattern, value)

    # Stage 3: anything with an operator or a class stays a regex (and still matches as one).
    for pattern in ["a.b", "a|b", "a+", "(?i)yes", "[ab]", "^a$", "\\d", "\\x41", "\\Qa.b\\E", "a{2}", "\\t"]:
        assert literal_text(pattern) is None, pattern
        assert not isinstance(compile_rule(pattern, "test"), Literal), pattern
    assert Match({"headers": {"x-dev": "(?i)YES"}}).matches(H(x_dev="yes"), b"/")

    # Stage 4: a bad escape is refused as before, not taken for a literal.
    with pytest.raises(ControlError):
        compile_rule("\\", "test")
