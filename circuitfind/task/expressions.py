"""Task expressions (answers, constraints, derived slots), parsed once and evaluated without `eval`.

An expression is Python syntax restricted to arithmetic (+ - * // % and unary minus),
comparisons, `and`/`or`/`not`, `in`, lists, string and number constants, slot names, a few
functions (abs, min, max, len, str, int, and rasp: a RASP program's output, task/rasp_programs.py) and lookups `table[key]` in the task's tables.
`text[i]` indexing, and `{slot}` pastes the slot's text before parsing, so `x {op} y` reads `x + y` when op is `+`.
"""

from __future__ import annotations

import ast
import operator
import re
import string
from typing import Any, Callable, Dict, Iterable, Mapping

from circuitfind.errors import CircuitfindError
from circuitfind.task.rasp_programs import run_program

Env = Mapping[str, Any]
Compiled = Callable[[Env], Any]

BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
FUNCTIONS: Dict[str, Callable] = {
    "abs": abs,
    "min": min,
    "max": max,
    "len": len,
    "str": str,
    "int": int,
    "rasp": run_program,  # rasp('reverse', t0, t1, t2, t3): a RASP program's output at each position (tracr)
}


def pasted_slots(text: str) -> list[str]:
    """The `{slot}` fields of a template or expression, in order."""
    return [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]


class Expression:
    """One expression of a task: checked against the names it may use, compiled per pasted text."""

    def __init__(self, text: str, names: Iterable[str], tables: Mapping[str, Mapping], where: str):
        self.text, self.names, self.tables, self.where = str(text), set(names), tables, where
        self.pastes = pasted_slots(self.text)
        unknown = [p for p in self.pastes if p not in self.names]
        if unknown:
            raise CircuitfindError(f"{where}: {self.text!r} pastes {{{unknown[0]}}}, which is not a slot of the task")
        # The slot names it reads (a pasted slot counts): every identifier of its text that is a slot.
        self.used = set(re.findall(r"[A-Za-z_]\w*", self.text)) & self.names
        self._compiled: Dict[str, Compiled] = {}
        self._by_paste: Dict[tuple, Compiled] = {}  # pasted texts -> compiled expression
        if not self.pastes:
            self.compile(self.text)

    def compile(self, text: str) -> Compiled:
        if text not in self._compiled:
            try:
                tree = ast.parse(text, mode="eval")
            except SyntaxError as exc:
                raise CircuitfindError(f"{self.where}: {text!r} is not an expression ({exc.msg})") from None
            self._compiled[text] = self._node(tree.body, text)
        return self._compiled[text]

    def __call__(self, env: Env) -> Any:
        """The value under slot values `env` (a pasted `{slot}` is the text of its value)."""
        if self.pastes:
            pasted = tuple([str(env[p]) for p in self.pastes])
            compiled = self._by_paste.get(pasted)
            if compiled is None:
                text = self.text.format_map(dict(zip(self.pastes, pasted)))
                compiled = self._by_paste[pasted] = self.compile(text)
        else:
            text, compiled = self.text, self._compiled[self.text]
        try:
            return compiled(env)
        except (TypeError, ZeroDivisionError, KeyError) as exc:
            text = self.text.format_map({p: str(env[p]) for p in self.pastes}) if self.pastes else self.text
            raise CircuitfindError(f"{self.where}: {text!r} cannot be evaluated for {dict(env)} ({exc!r})") from None

    def _node(self, node: ast.AST, text: str) -> Compiled:
        """A closure computing `node`; anything outside the small grammar is refused by name."""
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str)):
            value = node.value
            return lambda env: value
        if isinstance(node, ast.Name):
            return self._name(node.id, text)
        if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
            f, a, b = BINARY[type(node.op)], self._node(node.left, text), self._node(node.right, text)
            return lambda env: f(a(env), b(env))
        if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
            f, a = UNARY[type(node.op)], self._node(node.operand, text)
            return lambda env: f(a(env))
        if isinstance(node, ast.BoolOp):
            parts = [self._node(v, text) for v in node.values]
            if isinstance(node.op, ast.And):
                return lambda env: all(p(env) for p in parts)
            return lambda env: any(p(env) for p in parts)
        if isinstance(node, ast.Compare) and all(type(op) in COMPARE for op in node.ops):
            first = self._node(node.left, text)
            rest = [(COMPARE[type(op)], self._node(c, text)) for op, c in zip(node.ops, node.comparators)]
            if len(rest) == 1:  # the common case, `answer >= 0`, without the loop
                (f, right), left = rest[0], first
                return lambda env: f(left(env), right(env))

            def compare(env: Env) -> bool:
                left = first(env)
                for f, right in rest:
                    value = right(env)
                    if not f(left, value):
                        return False
                    left = value
                return True

            return compare
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [self._node(e, text) for e in node.elts]
            return lambda env: [i(env) for i in items]
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in self.tables:
            table, key = self.tables[node.value.id], self._node(node.slice, text)
            return lambda env: table[key(env)]
        if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Slice):
            value, index = self._node(node.value, text), self._node(node.slice, text)
            return lambda env: value(env)[index(env)]  # a character of a string, an item of a list
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
            f, args = FUNCTIONS[node.func.id], [self._node(a, text) for a in node.args]
            if node.keywords:
                raise CircuitfindError(f"{self.where}: {text!r}: give {node.func.id}() positional arguments only")
            return lambda env: f(*(a(env) for a in args))
        piece = ast.get_source_segment(text, node) or type(node).__name__
        raise CircuitfindError(
            f"{self.where}: {text!r} uses {piece!r}, which task expressions do not allow; "
            "use slot names, numbers, strings, + - * // %, comparisons, and/or/not, in, "
            f"{', '.join(FUNCTIONS)}(), table[key] and text[i]"
        )

    def _name(self, name: str, text: str) -> Compiled:
        if name not in self.names:
            known = ", ".join(sorted(self.names))
            raise CircuitfindError(f"{self.where}: {text!r} uses {name!r}, which is not a slot; the slots are {known}")
        return lambda env: env[name]
