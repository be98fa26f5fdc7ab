"""Seeded synthetic tasks mirroring the three evaluation figures of ReSSFormer (You & Liu, 2025).

An example is a prompt and a short answer over one vocabulary SYMBOLS; `to_text` writes each symbol as `<sym>`, a
sentencepiece user symbol, so one symbol is one token. Every prompt ends with `?` and the answer follows it.
Figure 1, accuracy vs input length: `hops`, variable tracking. Facts `a = 7 ;` and `c = a ;` in shuffled order, the
query variable ends a chain of 1-3 references; filler is distractor chains (1-4 facts) over fresh variables and,
once the 100 names run out, verbatim restatements of filler facts, so the answer stays unique at any length.
Figure 2, structure-sensitive tasks: `set` (unique mode of a digit multiset, order invariant), `table` (cell by row
and column), `reach` (is v reachable from u; yes/no by a fair coin, u has out-edges and v in-edges, never a direct
edge), `listops` (MAX/MIN/MED/SM over 2-5 arguments, nesting depth <= 3; MED the lower median, SM the sum mod 10).
Figure 3, robustness to distractors: `noisy`, two-hop questions (person `at` city, city `in` country) whose two
supporting passages sit among `setting` distractor passages of two facts each; distractors never mention the person
or city and never restate a subject, and draw countries from the whole pool, so elimination does not find the answer.
`setting` is the task's knob; Task.settings[0] is its training setting, the rest the figure's sweep.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable

DIGITS = tuple(str(i) for i in range(10))
NAMES = tuple(f"v{i}" for i in range(100))  # variables, table rows, graph nodes, people
COLUMNS = tuple(f"c{i}" for i in range(8))
CITIES = tuple(f"t{i}" for i in range(30))
COUNTRIES = tuple(f"k{i}" for i in range(10))
OPS: dict[str, Callable[[list[int]], int]] = {
    "MAX": max, "MIN": min, "MED": lambda xs: sorted(xs)[(len(xs) - 1) // 2], "SM": lambda xs: sum(xs) % 10}
MARKS = ("?", "=", ";", ":", ".", "#", "{", "}", "[", "]", "at", "in", "yes", "no")
SYMBOLS: tuple[str, ...] = MARKS + DIGITS + tuple(OPS) + NAMES + COLUMNS + CITIES + COUNTRIES
LISTOPS_DEPTH, LISTOPS_ARGS, TABLE_COLUMNS, PASSAGE_FACTS = 3, 5, 4, 2


@dataclass(frozen=True)
class Example:
    task: str
    setting: int
    prompt: tuple[str, ...]
    answer: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    name: str
    figure: int
    knob: str
    generate: Callable[[random.Random, int], Example]
    description: str
    settings: tuple[int, ...] = field(default=())  # [0]: training setting; all: the figure's sweep


TASKS: dict[str, Task] = {}


def _task(figure: int, knob: str, settings: tuple[int, ...], description: str):
    """Register `fn(rng, setting) -> (prompt, answer)` as the task named after it."""
    def register(fn):
        name = fn.__name__.lstrip("_")

        def gen(rng: random.Random, setting: int) -> Example:
            prompt, answer = fn(rng, setting)
            return Example(name, setting, tuple(prompt), tuple(answer))
        TASKS[name] = Task(name, figure, knob, gen, description, settings)
        return fn
    return register


def generate(task: str, n: int, seed: int, setting: int) -> list[Example]:
    """n examples of `task` at `setting`, a function of (task, n, seed, setting) alone."""
    rng = random.Random(f"{task}:{seed}:{setting}")
    return [TASKS[task].generate(rng, setting) for _ in range(n)]


def to_text(symbols) -> str:
    return "".join(f"<{s}>" for s in symbols)


def from_text(text: str) -> list[str]:
    if not re.fullmatch(r"(<[^<>\s]+>)*", text):
        raise ValueError(f"not a symbol string: {text[:80]!r}")
    return re.findall(r"<([^<>\s]+)>", text)


@_task(1, "prompt length in symbols", (96, 192, 384, 768), "value of a variable at the end of a 1-3 hop chain")
def _hops(rng: random.Random, length: int):
    n_facts, hops = (length - 2) // 4, rng.randint(1, 3)
    if n_facts < hops + 1:
        raise ValueError(f"hops: length {length} holds no {hops}-hop chain")
    names = rng.sample(NAMES, len(NAMES))

    def chain(k):  # a value fact, then k - 1 references each to the previous variable
        vs = [names.pop() for _ in range(k)]
        return vs[-1], [(vs[0], rng.choice(DIGITS))] + [(b, a) for a, b in zip(vs, vs[1:])]

    query, facts = chain(hops + 1)
    value = facts[0][1]
    filler: list[tuple[str, str]] = []
    while names and len(facts) + len(filler) < n_facts:
        filler += chain(min(rng.randint(1, 4), len(names), n_facts - len(facts) - len(filler)))[1]
    extra = n_facts - len(facts) - len(filler)
    facts += filler + [rng.choice(filler) for _ in range(extra)]
    rng.shuffle(facts)
    return [s for a, b in facts for s in (a, "=", b, ";")] + [query, "?"], [value]


@_task(2, "number of items", (24,), "unique most frequent digit of a multiset")
def _set(rng: random.Random, n: int):
    while True:
        items = [rng.choice(DIGITS) for _ in range(n)]
        counts = sorted((items.count(d), d) for d in set(items))
        if len(counts) == 1 or counts[-1][0] > counts[-2][0]:
            return ["{", *items, "}", "?"], [counts[-1][1]]


@_task(2, "number of rows", (6,), f"cell of a {TABLE_COLUMNS}-column table by row and column")
def _table(rng: random.Random, rows: int):
    names, cols = rng.sample(NAMES, rows), rng.sample(COLUMNS, TABLE_COLUMNS)
    cell = {(r, c): rng.choice(DIGITS) for r in names for c in cols}
    prompt = [s for r in names for s in (r, *(x for c in cols for x in (c, ":", cell[r, c])), ";")]
    r, c = rng.choice(names), rng.choice(cols)
    return prompt + [r, c, "?"], [cell[r, c]]


@_task(2, "number of nodes", (12,), "is v reachable from u in a directed graph (n + n/4 edges)")
def _reach(rng: random.Random, n: int):
    want = rng.random() < 0.5
    while True:
        nodes = rng.sample(NAMES, n)
        edges = rng.sample([(u, v) for u in nodes for v in nodes if u != v], n + n // 4)
        reach = {}
        for u in nodes:
            seen, todo = set(), [u]
            while todo:
                x = todo.pop()
                for a, b in edges:
                    if a == x and b not in seen:
                        seen.add(b)
                        todo.append(b)
            reach[u] = seen
        heads, tails = {a for a, _ in edges}, {b for _, b in edges}
        pairs = [(u, v) for u in sorted(heads) for v in sorted(tails)
                 if u != v and (u, v) not in edges and (v in reach[u]) == want]
        if pairs:
            u, v = rng.choice(pairs)
            return [s for e in edges for s in (*e, ";")] + [u, v, "?"], ["yes" if want else "no"]


def _expr(rng: random.Random, n: int, depth: int):
    """A random expression over n digits with 2..LISTOPS_ARGS arguments per operator: (symbols, value)."""
    if n == 1:
        d = rng.choice(DIGITS)
        return [d], int(d)
    cap = LISTOPS_ARGS ** (LISTOPS_DEPTH - depth)  # digits one argument can hold
    sizes = [1] * rng.randint(max(2, -(-n // cap)), min(n, LISTOPS_ARGS))
    for _ in range(n - len(sizes)):
        sizes[rng.choice([i for i, s in enumerate(sizes) if s < cap])] += 1
    op, toks, vals = rng.choice(tuple(OPS)), [], []
    for size in sizes:
        t, v = _expr(rng, size, depth + 1)
        toks += t
        vals.append(v)
    return ["[", op, *toks, "]"], OPS[op](vals)


@_task(2, "number of digits", (20,), f"value of a ListOps expression (depth <= {LISTOPS_DEPTH})")
def _listops(rng: random.Random, n: int):
    if not 2 <= n <= LISTOPS_ARGS ** LISTOPS_DEPTH:
        raise ValueError(f"listops: {n} digits do not fit depth {LISTOPS_DEPTH}")
    toks, value = _expr(rng, n, 1)
    return toks + ["?"], [str(value)]


@_task(3, "number of distractor passages", (0, 2, 4, 8, 16), "country of a person: person at city, city in country")
def _noisy(rng: random.Random, d: int):
    others = PASSAGE_FACTS * (d + 2) - 2
    if others > len(NAMES) + len(CITIES) - 2:
        raise ValueError(f"noisy: {d} distractor passages need more names")
    people, cities = rng.sample(NAMES, len(NAMES)), rng.sample(CITIES, len(CITIES))
    person, city, country = people.pop(), cities.pop(), rng.choice(COUNTRIES)
    elsewhere = [c for c in CITIES if c != city]

    def other():
        if cities and (not people or rng.random() < 0.5):
            return cities.pop(), "in", rng.choice(COUNTRIES)
        return people.pop(), "at", rng.choice(elsewhere)

    facts = [(person, "at", city), (city, "in", country)] + [other() for _ in range(others)]
    k = PASSAGE_FACTS - 1
    passages = [[facts[0], *facts[2:2 + k]], [facts[1], *facts[2 + k:2 + 2 * k]]]
    passages += [facts[i:i + PASSAGE_FACTS] for i in range(2 + 2 * k, len(facts), PASSAGE_FACTS)]
    for p in passages:
        rng.shuffle(p)
    rng.shuffle(passages)
    prompt = [s for p in passages for s in ("#", *(x for f in p for x in (*f, ".")))]
    return prompt + [person, "in", "?"], [country]
