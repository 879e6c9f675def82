"""peft's ``rank_pattern``/``alpha_pattern`` keys, matched in time linear in the module path.

peft applies a pattern to a module when ``re.match(rf"(.*\\.)?({pattern})$", path)`` succeeds. The patterns
come from files, and Python's backtracking engine takes exponential time on some of them
(``([a-z_.0-9]+)+!`` against a long path never returns). Here the same expression is compiled to a
Thompson NFA and run over the path once, tracking every state at every position: time proportional to
``len(path) × len(pattern)``, whatever the pattern.

The language is what such keys use: literal characters and escapes (``\\.``, ``\\d \\w \\s`` and their
negations, ``\\t \\n``), ``.``, character classes (``[a-z_0-9]``, ``[^.]``), groups (``(…)``, ``(?:…)``,
``(?P<name>…)``), alternation ``|``, repetition ``* + ? {m} {m,} {m,n}`` (lazy forms match the same), and
the anchors ``^ $ \\A \\Z``. Anything else (back-references, look-arounds, inline flags) is a
:class:`PatternError` that names what is not supported: refused, never guessed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

MAX_PATTERN_CHARS = 2000
MAX_STATES = 20_000
MAX_NESTING = 50

Predicate = Callable[[str], bool]


class PatternError(ValueError):
    """A pattern outside the supported language, or too large."""


_CATEGORIES: dict[str, Predicate] = {
    "d": str.isdecimal, "D": lambda c: not c.isdecimal(),
    "w": lambda c: c.isalnum() or c == "_", "W": lambda c: not (c.isalnum() or c == "_"),
    "s": str.isspace, "S": lambda c: not c.isspace(),
}
_CONTROL = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v"}


# -- parsing: pattern text -> a small tree ---------------------------------------------------------

@dataclass
class _Atom:
    test: Predicate


@dataclass
class _Anchor:
    at: str  # "^" or "$"


@dataclass
class _Seq:
    items: list


@dataclass
class _Alt:
    options: list


@dataclass
class _Repeat:
    node: object
    low: int
    high: int | None


class _Parser:
    def __init__(self, text: str):
        self.text, self.pos, self.depth = text, 0, 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self) -> str:
        c = self.peek()
        self.pos += 1
        return c

    def parse(self) -> object:
        node = self.alternation()
        if self.pos != len(self.text):
            raise PatternError(f"unbalanced ')' at position {self.pos}")
        return node

    def alternation(self) -> object:
        options = [self.sequence()]
        while self.peek() == "|":
            self.take()
            options.append(self.sequence())
        return options[0] if len(options) == 1 else _Alt(options)

    def sequence(self) -> _Seq:
        items = []
        while self.peek() not in ("", "|", ")"):
            items.append(self.repeated(self.atom()))
        return _Seq(items)

    def repeated(self, node: object) -> object:
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.take()
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            elif c == "{" and self._counted() is not None:
                low, high = self._counted()  # type: ignore[misc]
                self.pos = self.text.index("}", self.pos) + 1
            else:
                return node
            if isinstance(node, _Anchor):
                raise PatternError("a repeated anchor")
            if self.peek() in ("?", "+"):  # lazy or possessive: the same strings match
                self.take()
            node = _Repeat(node, low, high)

    def _counted(self) -> tuple[int, int | None] | None:
        end = self.text.find("}", self.pos)
        body = self.text[self.pos + 1:end] if end > 0 else ""
        low, comma, high = body.partition(",")
        if not low.isdigit() or (high and not high.isdigit()):
            return None  # "{" not starting a count is a literal, as in Python
        lo = int(low)
        hi = lo if not comma else (int(high) if high else None)
        if hi is not None and hi < lo:
            raise PatternError(f"repetition {{{body}}} has its bounds reversed")
        if lo > 1000 or (hi or 0) > 1000:
            raise PatternError(f"repetition {{{body}}} is too large")
        return lo, hi

    def atom(self) -> object:
        c = self.take()
        if c == "(":
            return self.group()
        if c == ".":
            return _Atom(lambda ch: ch != "\n")
        if c == "[":
            return _Atom(self.char_class())
        if c in ("^", "$"):
            return _Anchor(c)
        if c == "\\":
            return self.escape(in_class=False)
        if c in ("*", "+", "?"):
            raise PatternError(f"nothing to repeat at position {self.pos - 1}")
        return _Atom(lambda ch, c=c: ch == c)

    def group(self) -> object:
        if self.peek() == "?":
            rest = self.text[self.pos:]
            if rest.startswith("?:"):
                self.pos += 2
            elif rest.startswith("?P<") and ">" in rest:
                self.pos += rest.index(">") + 1
            else:
                raise PatternError(f"'(?{rest[1:2]}' (look-arounds, flags, back-references) is not supported")
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise PatternError(f"groups nested more than {MAX_NESTING} deep")
        node = self.alternation()
        self.depth -= 1
        if self.take() != ")":
            raise PatternError("missing ')'")
        return node

    def escape(self, *, in_class: bool) -> object:
        c = self.take()
        if not c:
            raise PatternError("a pattern ending in '\\'")
        if c in _CATEGORIES:
            return _Atom(_CATEGORIES[c]) if not in_class else _CATEGORIES[c]
        if not in_class and c in ("A", "Z"):
            return _Anchor("^" if c == "A" else "$")
        if c in _CONTROL:
            c = _CONTROL[c]
        elif c.isalnum():
            raise PatternError(f"the escape '\\{c}' is not supported")
        return _Atom(lambda ch, c=c: ch == c) if not in_class else c

    def char_class(self) -> Predicate:
        negate = self.peek() == "^"
        if negate:
            self.take()
        singles: set[str] = set()
        ranges: list[tuple[str, str]] = []
        tests: list[Predicate] = []
        first = True
        while True:
            c = self.take()
            if not c:
                raise PatternError("missing ']'")
            if c == "]" and not first:
                break
            first = False
            if c == "\\":
                got = self.escape(in_class=True)
                if callable(got):
                    tests.append(got)
                    continue
                c = got  # type: ignore[assignment]
            if self.peek() == "-" and self.text[self.pos + 1:self.pos + 2] not in ("]", ""):
                self.take()
                hi = self.take()
                if hi == "\\":
                    hi = self.escape(in_class=True)  # type: ignore[assignment]
                    if callable(hi):
                        raise PatternError("a range ending in a character category")
                if hi < c:
                    raise PatternError(f"the range {c}-{hi} is reversed")
                ranges.append((c, hi))
            else:
                singles.add(c)

        def test(ch: str) -> bool:
            hit = ch in singles or any(a <= ch <= b for a, b in ranges) or any(t(ch) for t in tests)
            return hit != negate

        return test


# -- compiling: tree -> NFA states -----------------------------------------------------------------

class _Nfa:
    """States: ("char", test, next), ("split", a, b), ("anchor", at, next), ("match",)."""

    def __init__(self) -> None:
        self.states: list[list] = []

    def add(self, state: list) -> int:
        if len(self.states) >= MAX_STATES:
            raise PatternError("too large once its repetitions are expanded")
        self.states.append(state)
        return len(self.states) - 1

    def build(self, node: object, out: int) -> int:
        """The entry state of ``node``, whose exit goes to ``out``."""
        if isinstance(node, _Atom):
            return self.add(["char", node.test, out])
        if isinstance(node, _Anchor):
            return self.add(["anchor", node.at, out])
        if isinstance(node, _Seq):
            for item in reversed(node.items):
                out = self.build(item, out)
            return out
        if isinstance(node, _Alt):
            entries = [self.build(o, out) for o in node.options]
            entry = entries[-1]
            for e in reversed(entries[:-1]):
                entry = self.add(["split", e, entry])
            return entry
        assert isinstance(node, _Repeat)
        if node.high is None:  # low copies, then a loop
            loop = self.add(["split", -1, out])
            self.states[loop][1] = self.build(node.node, loop)
            out = loop
        else:
            for _ in range(node.high - node.low):
                out = self.add(["split", self.build(node.node, out), out])
        for _ in range(node.low):
            out = self.build(node.node, out)
        return out


@dataclass(frozen=True)
class Matcher:
    """A compiled pattern: :meth:`matches` runs the NFA over a string once."""

    pattern: str
    states: tuple
    start: int

    def _close(self, found: set[int], stack: list[int], pos: int, end: int) -> None:
        while stack:
            i = stack.pop()
            if i in found:
                continue
            found.add(i)
            st = self.states[i]
            if st[0] == "split":
                stack.extend((st[2], st[1]))
            elif st[0] == "anchor" and (pos == 0 if st[1] == "^" else pos == end):
                stack.append(st[2])

    def matches(self, text: str) -> bool:
        """Whether the whole of ``text`` matches (``^``/``$`` hold at its ends)."""
        current: set[int] = set()
        self._close(current, [self.start], 0, len(text))
        for pos, ch in enumerate(text):
            nxt: set[int] = set()
            step = [self.states[i][2] for i in current if self.states[i][0] == "char" and self.states[i][1](ch)]
            if not step:
                return False
            self._close(nxt, step, pos + 1, len(text))
            current = nxt
        return any(self.states[i][0] == "match" for i in current)


@functools.lru_cache(maxsize=4096)
def compile_peft_pattern(pattern: str) -> Matcher:
    """peft's rule for a ``rank_pattern``/``alpha_pattern`` key, ``(.*\\.)?(pattern)$`` from the start of a
    module path, as a :class:`Matcher` (:class:`PatternError` when the key is outside the language)."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"longer than {MAX_PATTERN_CHARS} characters")
    tree = _Parser(pattern).parse()
    whole = _Seq([_Repeat(_Seq([_Repeat(_Atom(lambda ch: ch != "\n"), 0, None), _Atom(lambda ch: ch == ".")]), 0, 1),
                  tree, _Anchor("$")])
    nfa = _Nfa()
    final = nfa.add(["match"])
    start = nfa.build(whole, final)
    return Matcher(pattern, tuple(nfa.states), start)
