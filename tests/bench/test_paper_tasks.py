"""bench/paper/tasks.py: determinism, vocabulary, lengths, and every answer checked by an independent solver."""

import random
from collections import Counter, deque

import pytest

from bench.paper.tasks import SYMBOLS, TASKS, Example, from_text, generate, to_text


def _groups(seq, size):
    assert len(seq) % size == 0
    return [tuple(seq[i:i + size]) for i in range(0, len(seq), size)]


def solve_hops(prompt):
    """Follow the chain from the queried variable; every variable must have one right-hand side."""
    assert prompt[-1] == "?"
    rhs: dict[str, set[str]] = {}
    for a, eq, b, semi in _groups(prompt[:-2], 4):
        assert (eq, semi) == ("=", ";")
        rhs.setdefault(a, set()).add(b)
    assert all(len(v) == 1 for v in rhs.values())
    var, hops = prompt[-2], 0
    while not var.isdigit():
        (var,) = rhs[var]
        hops += 1
        assert hops <= len(rhs)
    return var, hops - 1  # references followed


def solve_set(prompt):
    assert (prompt[0], prompt[-2], prompt[-1]) == ("{", "}", "?")
    (top, k), *rest = Counter(prompt[1:-2]).most_common()
    assert not rest or rest[0][1] < k
    return top


def parse_table(prompt):
    rows, row = {}, []
    for s in prompt[:-3]:
        if s != ";":
            row.append(s)
            continue
        name, cells = row[0], _groups(row[1:], 3)
        assert name not in rows and all(colon == ":" for _, colon, _ in cells)
        rows[name], row = {c: v for c, _, v in cells}, []
    assert not row and len({tuple(r) for r in rows.values()}) == 1  # one schema, same column order
    return rows


def solve_reach(prompt):
    edges = [(u, v) for u, v, semi in _groups(prompt[:-3], 3) if semi == ";"]
    u, v = prompt[-3:-1]
    assert len(edges) == len(set(edges)) == len(prompt[:-3]) // 3 and (u, v) not in edges and u != v
    assert any(a == u for a, _ in edges) and any(b == v for _, b in edges)  # no isolated-endpoint shortcut
    seen, todo = {u}, deque([u])
    while todo:
        x = todo.popleft()
        for a, b in edges:
            if a == x and b not in seen:
                seen.add(b)
                todo.append(b)
    return "yes" if v in seen else "no"


def eval_listops(prompt):
    """Recursive-descent evaluation: (value, nesting depth, digits)."""
    ops = {"MAX": max, "MIN": min, "MED": lambda xs: sorted(xs)[(len(xs) - 1) // 2],
           "SM": lambda xs: sum(xs) % 10}
    pos = 0

    def node():
        nonlocal pos
        s = prompt[pos]
        pos += 1
        if s.isdigit():
            return int(s), 0, 1
        assert s == "["
        op = prompt[pos]
        pos += 1
        args = []
        while prompt[pos] != "]":
            args.append(node())
        pos += 1
        assert 2 <= len(args) <= 5
        return ops[op]([a[0] for a in args]), 1 + max(a[1] for a in args), sum(a[2] for a in args)

    out = node()
    assert prompt[pos:] == ("?",)
    return out


def solve_noisy(prompt):
    """(answer, passages, facts): person -> city -> country, with no subject given two objects."""
    person, rel, q = prompt[-3:]
    assert (rel, q) == ("in", "?") and prompt[0] == "#"
    passages, facts = [], {}
    for s in prompt[:-3]:
        if s == "#":
            passages.append([])
        else:
            passages[-1].append(s)
    for p in passages:
        for a, r, b, dot in _groups(p, 4):
            assert r in ("at", "in") and dot == "."
            assert facts.setdefault(a, (r, b)) == (r, b)
    city = facts[person][1]
    return facts[city][1], passages, facts


def _all(task, n=50, seed=0, setting=None):
    return generate(task, n, seed, TASKS[task].settings[0] if setting is None else setting)


def test_vocabulary_and_registry():
    assert isinstance(SYMBOLS, tuple) and len(SYMBOLS) == len(set(SYMBOLS)) <= 200
    assert all(s and not any(c in s for c in "<> \t\n") for s in SYMBOLS)
    assert {t: TASKS[t].figure for t in TASKS} == {"hops": 1, "set": 2, "table": 2, "reach": 2, "listops": 2,
                                                   "noisy": 3}
    assert TASKS["noisy"].settings == (0, 2, 4, 8, 16)
    assert from_text("") == [] and from_text("<a><v12><?>") == ["a", "v12", "?"]
    for bad in ("a<b>", "<a", "<a b>", "<>"):
        with pytest.raises(ValueError):
            from_text(bad)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_symbols_round_trip(task):
    for setting in TASKS[task].settings:
        a = generate(task, 20, 3, setting)
        assert a == generate(task, 20, 3, setting) and a != generate(task, 20, 4, setting)
        assert generate(task, 5, 3, setting) == a[:5]
        for ex in a:
            assert isinstance(ex, Example) and (ex.task, ex.setting) == (task, setting)
            assert ex.prompt[-1] == "?" and len(ex.answer) == 1
            assert set(ex.prompt + ex.answer) <= set(SYMBOLS)
            assert from_text(to_text(ex.prompt)) == list(ex.prompt)
        assert len({ex.prompt for ex in a}) == len(a)


def test_hops_lengths_chains_and_answers():
    hops, answers = Counter(), Counter()
    lengths = [*range(64, 97), 192, 384, 768, 19]
    for L in lengths:
        for ex in generate("hops", 12, L, L):
            assert L - 8 <= len(ex.prompt) <= L
            ans, h = solve_hops(ex.prompt)
            assert ex.answer == (ans,) and 1 <= h <= 3
            hops[h] += 1
            answers[ans] += 1
    assert set(hops) == {1, 2, 3} and min(hops.values()) > 0.2 * sum(hops.values())
    assert len(answers) >= 8
    with pytest.raises(ValueError):
        generate("hops", 20, 0, 10)


def test_set_mode_is_order_invariant():
    answers = Counter()
    for ex in _all("set", 200) + generate("set", 20, 0, 3):
        items = list(ex.prompt[1:-2])
        random.Random(len(answers)).shuffle(items)
        assert ex.answer == (solve_set(ex.prompt),) == (solve_set(("{", *items, "}", "?")),)
        answers[ex.answer] += 1
    assert len(answers) == 10
    assert len(_all("set")[0].prompt) == 27


def test_table_lookup():
    answers = Counter()
    for ex in _all("table", 200):
        rows = parse_table(ex.prompt)
        r, c = ex.prompt[-3:-1]
        assert len(rows) == 6 and ex.answer == (rows[r][c],)
        answers[ex.answer] += 1
    assert len(answers) == 10 and len(ex.prompt) <= 96


def test_reach_balanced():
    exs = _all("reach", 400)
    for ex in exs:
        assert ex.answer == (solve_reach(ex.prompt),)
        assert len({s for s in ex.prompt[:-1] if s != ";"}) <= 12 and len(ex.prompt) <= 96
    yes = sum(ex.answer == ("yes",) for ex in exs) / len(exs)
    assert 0.42 < yes < 0.58


def test_listops_values_depth_digits():
    answers = Counter()
    for n in (2, 5, 20, 125):
        for ex in generate("listops", 100 if n == 20 else 20, 0, n):
            value, depth, digits = eval_listops(ex.prompt)
            assert ex.answer == (str(value),) and 1 <= depth <= 3 and digits == n
            answers[ex.answer] += n == 20
    assert sum(c > 0 for c in answers.values()) >= 6 and max(answers.values()) < 50
    with pytest.raises(ValueError):
        generate("listops", 1, 0, 126)


def test_noisy_supporting_and_distractor_passages():
    answers = Counter()
    for d in TASKS["noisy"].settings:
        for ex in generate("noisy", 50, 0, d):
            ans, passages, facts = solve_noisy(ex.prompt)
            assert ex.answer == (ans,) and len(passages) == d + 2
            person, city = ex.prompt[-3], facts[ex.prompt[-3]][1]
            support = [p for p in passages if person in p or city in p]  # person at city / city in country
            assert len(support) == 2 and sum(city in p[::4] for p in support) == 1
            assert ex.prompt[:-3].count(person) == 1 and ex.prompt[:-3].count(city) == 2
            assert len(ex.prompt) <= 400
            answers[ans] += 1
    assert len(answers) == 10
    countries = [Counter(f[1] for f in solve_noisy(ex.prompt)[2].values() if f[0] == "in")
                 for ex in generate("noisy", 100, 1, 16)]
    assert sum(c[ex.answer[0]] > 1 for c, ex in zip(countries, generate("noisy", 100, 1, 16))) > 50
