"""
Tests for L{dragonfly.core.rendezvous}: parsing C{--supernode} and ranking
nodes per task by weighted rendezvous hashing.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dragonfly.core.rendezvous import Node, owner, parse_nodes, rank, score

# -- parsing -------------------------------------------------------------------------


def test_parse_dragonfly_form() -> None:
    assert parse_nodes("10.0.0.1:8002=2, sn2:9000,SN3=5,https://sn4:443=1") == [
        Node("10.0.0.1:8002", 2),
        Node("sn2:9000", 1),
        Node("sn3:8002", 5),
        Node("https://sn4:443", 1),
    ]
    assert parse_nodes("[::1]:8003=3,[fe80::1]") == [Node("[::1]:8003", 3), Node("[fe80::1]:8002", 1)]
    assert parse_nodes("a", default_port=65001) == [Node("a:65001", 1)]
    assert parse_nodes("http://a:1/") == [Node("a:1", 1)]


@pytest.mark.parametrize("text", ["a:8002=x", "a:8002=0", "a:8002=-1", "a:8002=1.5", "a:8002=", "a=2w", "a=１"])
def test_unknown_weight_form_is_a_clear_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"weight .* is not a whole number of at least 1 \(the form is host\[:port\]\[=weight\]"):
        parse_nodes(text)


@pytest.mark.parametrize("text, why", [
    ("", "no supernode"), (" , ", "no supernode"), ("a:0", "is not host"), ("a:70000", "is not host"),
    (":8002", "is not host"), ("a:b:c", "IPv6"), ("[::1", "IPv6"), ("a:8002,A:8002=3", "listed twice"),
])
def test_bad_addresses(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_nodes(text)


@given(st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9.-]{0,20}", fullmatch=True), st.integers(1, 65535),
                          st.none() | st.integers(1, 1000)), min_size=1, max_size=6,
                unique_by=lambda t: (t[0], t[1])))
def test_parse_round_trip(entries: list[tuple[str, int, int | None]]) -> None:
    text = ",".join(f"{h}:{p}" + (f"={w}" if w is not None else "") for h, p, w in entries)
    assert parse_nodes(text) == [Node(f"{h}:{p}", w or 1) for h, p, w in entries]


@given(st.text(max_size=40))
def test_parse_never_crashes(text: str) -> None:
    try:
        nodes = parse_nodes(text)
    except ValueError:
        return
    assert nodes and all(n.weight >= 1 for n in nodes)


# -- ranking -------------------------------------------------------------------------

TASK_IDS = st.text(alphabet="0123456789abcdef", min_size=1, max_size=64)
NODES = st.lists(
    st.builds(Node, st.from_regex(r"sn[0-9]{1,3}:800[0-9]", fullmatch=True), st.integers(1, 10)),
    min_size=1, max_size=8, unique_by=lambda n: n.address,
)


@given(NODES, TASK_IDS, st.randoms())
def test_ranking_is_stable_whatever_the_order_given(nodes: list[Node], task: str, rnd) -> None:  # type: ignore[no-untyped-def]
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    assert rank(nodes, task) == rank(shuffled, task)
    assert sorted(rank(nodes, task), key=lambda n: n.address) == sorted(nodes, key=lambda n: n.address)
    assert owner(shuffled, task) == rank(nodes, task)[0]


@given(NODES, st.builds(Node, st.from_regex(r"new[0-9]:1", fullmatch=True), st.integers(1, 10)), TASK_IDS)
def test_a_joining_node_moves_only_what_it_takes(nodes: list[Node], new: Node, task: str) -> None:
    before = rank(nodes, task)
    after = rank(nodes + [new], task)
    # the other nodes keep their order; the newcomer is inserted somewhere
    assert [n for n in after if n != new] == before
    # so a task changes owner only to the newcomer
    assert after[0] in (before[0], new)


@given(NODES.filter(lambda ns: len(ns) >= 2), st.data())
def test_a_leaving_node_hands_over_only_its_own_tasks(nodes: list[Node], data: st.DataObject) -> None:
    gone = data.draw(st.sampled_from(nodes))
    task = data.draw(TASK_IDS)
    before = rank(nodes, task)
    after = rank([n for n in nodes if n != gone], task)
    assert after == [n for n in before if n != gone]
    if before[0] != gone:
        assert after[0] == before[0]


@settings(max_examples=5, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=2, max_size=4))
def test_ownership_follows_weight(weights: list[int]) -> None:
    nodes = [Node(f"sn{k}:8002", w) for k, w in enumerate(weights)]
    tasks = 3000
    owned = dict.fromkeys(nodes, 0)
    for t in range(tasks):
        owned[owner(nodes, f"{t:064x}")] += 1
    total = sum(weights)
    for n in nodes:
        share = owned[n] / tasks
        assert abs(share - n.weight / total) < 0.035, (n, share)


def test_movement_when_a_node_joins_is_about_its_share() -> None:
    nodes = [Node(f"sn{k}:8002", 1) for k in range(4)]
    tasks = [f"{t:064x}" for t in range(4000)]
    moved = sum(owner(nodes, t) != owner(nodes + [Node("sn9:8002", 1)], t) for t in tasks)
    # a fifth node of equal weight takes about a fifth, and nothing else moves
    assert 0.16 < moved / len(tasks) < 0.24


def test_scores_are_deterministic_and_positive() -> None:
    n = Node("sn1:8002", 3)
    assert score(n, "abc") == score(Node("sn1:8002", 3), "abc")
    assert score(n, "abc") == 3 * score(Node("sn1:8002", 1), "abc")
    assert score(n, "abc") > 0
    with pytest.raises(ValueError):
        owner([], "abc")
