"""Every message a user can meet, read from the package source, and a check that
docs/errors.md has a row for each of them and no row for a message the code no longer has.

Usage::

    python -m moco_d2.error_catalog                          # one message per line, file:line
    python -m moco_d2.error_catalog --check docs/errors.md   # exit 1 on any mismatch

What counts as a message (found with ``ast``; nothing is imported, detectron2 is not needed):

* errors: every call that constructs an error class, wherever it stands (``raise X(...)``,
  ``return X(...)`` in a helper). The error classes are the roots in :data:`ROOTS` and every
  class of the package that derives from one of them (by AST, by class name). A module-level
  function that returns such a construction is a factory: each call of it is a site, with its
  arguments put into the factory's message.
* notices: ``print(...)`` calls that write to ``sys.stderr`` (a leading ``error: `` dropped;
  one with no other fixed text, such as ``error: {e}``, only relays an error and is none)
  and prints whose text begins with ``nothing to do`` (the exit-0 refusals).

A message's template is its fixed text with ``{…}`` for each variable part. Resolved: string
literals, implicit concatenation, ``+``, f-strings, ``"..." % args``, ``"...".format(...)``,
a name bound once in the enclosing function (or a parameter filled in by a factory's
caller), a module-level string constant (also imported from another module of the package),
and a call of a package function with one ``return``. Any other expression is a ``{…}``. A
site whose template has no fixed text is unresolved: it must be listed in :data:`UNRESOLVED`
with the reason, or the check fails.

A row of docs/errors.md: a line of a Markdown table whose header's first cell is
``Message``. Every backticked span in that first cell is one message (several are written
``a`` / ``b``); a span may use double backticks to hold a backtick, and ``\\|`` for ``|``.
In a row's message a placeholder is an ALL-CAPS word of 1–8 letters (F, N, ARCH, FORMAT) or
``...``. A row matches a code template when, whitespace runs taken as one space, the row is
the template with each ``{…}`` replaced by exactly one placeholder: full match, so shortened
quotes and example values (``got -1.0``) do not match. To write a row, copy the line this
module prints and replace each ``{…}`` with a placeholder name.
"""

import argparse
import ast
import os
import re
import string
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

PACKAGE = os.path.dirname(os.path.abspath(__file__))

# Exception classes whose message reaches the user as one line, and how.
ROOTS = {
    "UserError": "moco_d2.cli.run_tool prints `error: MESSAGE`, exit 2",
    "InstallError": "python -m moco_d2.install_detectron2 prints `error: MESSAGE`, exit 2",
    "NothingToDo": "pretraining logs `nothing to do: MESSAGE`, exit 0",
    "ArgumentTypeError": "argparse reports `argument FLAG: MESSAGE` through "
    "moco_d2.cli.ArgumentParser.error, a UserError",
}

# (file relative to the repository, enclosing function) -> why its message has no fixed text.
UNRESOLVED: dict[tuple[str, str], str] = {}

NOTICE = "notice"
HOLE = "{…}"
_MAX_DEPTH = 8  # nested resolution (a name bound to a call of a function returning a name ...)
_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa%]")
_PLACEHOLDER = r"(?:[A-Z]{1,8}|\.\.\.)"
_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


@dataclass(frozen=True)
class Hole:
    """A variable part; ``name`` is the parameter it comes from, for a factory's callers."""

    name: str | None = None


Parts = list  # of str and Hole


@dataclass(frozen=True)
class Site:
    path: str  # relative to the repository
    line: int
    kind: str  # the error class, or NOTICE
    function: str  # enclosing function, "" at module level
    parts: tuple

    @property
    def template(self) -> str:
        return " ".join("".join(HOLE if isinstance(p, Hole) else p for p in self.parts).split())

    @property
    def resolved(self) -> bool:
        return any(isinstance(p, str) and p.strip() for p in self.parts)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.kind}] {self.template}"


@dataclass(frozen=True)
class Row:
    line: int
    message: str  # whitespace-normalised


def _normalise(parts: Iterable) -> tuple:
    """Adjacent strings joined, adjacent holes merged into one."""
    out: list = []
    for part in parts:
        if isinstance(part, str):
            if not part:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += part
                continue
        elif out and isinstance(out[-1], Hole):
            out[-1] = Hole(None)
            continue
        out.append(part)
    return tuple(out)


def _has_text(parts) -> bool:
    return parts is not None and any(isinstance(p, str) for p in parts)


class _Module:
    def __init__(self, path: str, tree: ast.Module) -> None:
        self.path = path
        self.tree = tree
        self.functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        self.constants = {
            n.targets[0].id: n.value
            for n in tree.body
            if isinstance(n, ast.Assign)
            and len(n.targets) == 1
            and isinstance(n.targets[0], ast.Name)
        }
        self.imports = {
            alias.asname or alias.name: (n.module, alias.name)
            for n in tree.body
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("moco_d2")
            for alias in n.names
        }


@dataclass
class _Scope:
    module: _Module
    function: ast.FunctionDef | None
    bindings: dict  # parameter -> Parts, when a caller filled them in


def _parameters(function: ast.FunctionDef) -> list[str]:
    a = function.args
    return [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]


def _single_assignment(function: ast.FunctionDef, name: str) -> ast.expr | None:
    """The value ``name`` is bound to in ``function``, if it is bound exactly once."""
    values, count = [], 0
    for node in ast.walk(function):
        targets: list = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign | ast.For | ast.comprehension):
            targets = [node.target]
        elif isinstance(node, ast.withitem) and node.optional_vars is not None:
            targets = [node.optional_vars]
        elif isinstance(node, ast.NamedExpr):
            targets = [node.target]
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Name) and leaf.id == name:
                    count += 1
                    if isinstance(node, ast.Assign) and target is leaf:
                        values.append(node.value)
    return values[0] if count == 1 and len(values) == 1 else None


class Catalog:
    """The parsed package: its error classes, factories and message sites."""

    def __init__(self, sources: dict[str, str]) -> None:
        """``sources``: file path relative to the repository -> Python source text."""
        self.modules = {
            _module_name(path): _Module(path, ast.parse(text, path))
            for path, text in sources.items()
        }
        self.error_classes = self._error_classes()
        self.factories = {
            (name, fn.name): fn
            for name, module in self.modules.items()
            for fn in module.functions.values()
            if any(isinstance(n, ast.Return) and self._constructs(n.value) for n in ast.walk(fn))
        }

    @classmethod
    def from_package(cls, root: str = PACKAGE) -> "Catalog":
        return cls(package_sources(root))

    def _error_classes(self) -> set[str]:
        bases = {
            node.name: {_last_name(b) for b in node.bases}
            for module in self.modules.values()
            for node in ast.walk(module.tree)
            if isinstance(node, ast.ClassDef)
        }
        found = set(ROOTS)
        while True:
            more = {name for name, of in bases.items() if of & found} - found
            if not more:
                return found
            found |= more

    def _class_name(self, call: ast.Call) -> str | None:
        name = _last_name(call.func)
        return name if name in self.error_classes else None

    def _constructs(self, node: ast.AST | None) -> bool:
        return isinstance(node, ast.Call) and self._class_name(node) is not None

    def _function(self, module: _Module, name: str) -> tuple[_Module, ast.FunctionDef] | None:
        if name in module.functions:
            return module, module.functions[name]
        source = module.imports.get(name)
        if source and source[0] in self.modules and source[1] in self.modules[source[0]].functions:
            other = self.modules[source[0]]
            return other, other.functions[source[1]]
        return None

    def _factory(self, module: _Module, call: ast.Call) -> tuple[_Module, ast.FunctionDef] | None:
        """The factory ``call`` calls, if it calls one."""
        if not isinstance(call.func, ast.Name):
            return None
        found = self._function(module, call.func.id)
        if found is None or (_module_name(found[0].path), found[1].name) not in self.factories:
            return None
        return found

    def _bind(self, function: ast.FunctionDef, call: ast.Call, scope: _Scope, depth: int) -> dict:
        params = _parameters(function)
        if params and params[0] in ("self", "cls"):
            params = params[1:]
        bindings = {}
        for param, arg in zip(params, call.args):
            bindings[param] = self._resolve(arg, scope, depth + 1) or [Hole(param)]
        for keyword in call.keywords:
            if keyword.arg:
                bindings[keyword.arg] = self._resolve(keyword.value, scope, depth + 1) or [
                    Hole(keyword.arg)
                ]
        return bindings

    def _resolve(self, node: ast.AST, scope: _Scope, depth: int = 0) -> Parts | None:
        """The message parts of ``node``, or None when it is not a string expression."""
        if depth > _MAX_DEPTH:
            return None
        if isinstance(node, ast.Constant):
            return [node.value] if isinstance(node.value, str) else None
        if isinstance(node, ast.JoinedStr):
            parts: Parts = []
            for value in node.values:
                if isinstance(value, ast.Constant):
                    parts.append(value.value)
                elif value.conversion == -1 and value.format_spec is None:
                    inner = self._resolve(value.value, scope, depth + 1)
                    parts += inner if _has_text(inner) else [self._hole(value.value)]
                else:
                    parts.append(self._hole(value.value))
            return parts
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left = self._resolve(node.left, scope, depth + 1)
            right = self._resolve(node.right, scope, depth + 1)
            if not (_has_text(left) or _has_text(right)):
                return None
            return (left or [self._hole(node.left)]) + (right or [self._hole(node.right)])
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
            left = self._resolve(node.left, scope, depth + 1)
            if left is None:
                return None
            return [piece for p in left for piece in (_printf(p) if isinstance(p, str) else [p])]
        if isinstance(node, ast.Name):
            return self._resolve_name(node.id, scope, depth)
        if isinstance(node, ast.Call):
            return self._resolve_call(node, scope, depth)
        return None

    def _hole(self, node: ast.AST) -> Hole:
        return Hole(node.id if isinstance(node, ast.Name) else None)

    def _resolve_name(self, name: str, scope: _Scope, depth: int) -> Parts | None:
        if name in scope.bindings:
            return scope.bindings[name]
        if scope.function is not None:
            if name in _parameters(scope.function):
                return [Hole(name)]
            value = _single_assignment(scope.function, name)
            if value is not None:
                return self._resolve(value, scope, depth + 1)
        module = scope.module
        if name in module.constants:
            return self._resolve(module.constants[name], _Scope(module, None, {}), depth + 1)
        source = module.imports.get(name)
        if source and source[0] in self.modules:
            other = self.modules[source[0]]
            if source[1] in other.constants:
                return self._resolve(other.constants[source[1]], _Scope(other, None, {}), depth + 1)
        return None

    def _resolve_call(self, call: ast.Call, scope: _Scope, depth: int) -> Parts | None:
        func = call.func
        if isinstance(func, ast.Attribute) and func.attr == "format":
            template = self._resolve(func.value, scope, depth + 1)
            if template is None:
                return None
            keywords = {
                k.arg: self._resolve(k.value, scope, depth + 1) or [self._hole(k.value)]
                for k in call.keywords
                if k.arg
            }
            return [
                piece
                for p in template
                for piece in (_format(p, keywords) if isinstance(p, str) else [p])
            ]
        if not isinstance(func, ast.Name):
            return None
        found = self._function(scope.module, func.id)
        if found is None:
            return None
        module, function = found
        returns = [n for n in ast.walk(function) if isinstance(n, ast.Return)]
        if len(returns) != 1 or returns[0].value is None:
            return None
        inner = _Scope(module, function, self._bind(function, call, scope, depth))
        return self._resolve(returns[0].value, inner, depth + 1)

    def sites(self) -> list[Site]:
        """Every message site of the package, in file and line order."""
        found = []
        for name, module in self.modules.items():
            found += self._module_sites(name, module)
        return sorted(found, key=lambda s: (s.path, s.line, s.template))

    def _module_sites(self, name: str, module: _Module) -> Iterator[Site]:
        for function, call in _calls(module.tree):
            scope = _Scope(module, function, {})
            where = function.name if function is not None else ""
            kind = self._class_name(call)
            if kind is not None:
                if function is not None and (name, function.name) in self.factories:
                    continue  # reported at each call of the factory
                parts = self._resolve(call.args[0], scope) if call.args else None
                yield self._site(module, call, kind, where, parts)
            elif self._factory(module, call) is not None:
                target_module, target = self._factory(module, call)
                construction = next(
                    n.value
                    for n in ast.walk(target)
                    if isinstance(n, ast.Return) and self._constructs(n.value)
                )
                inner = _Scope(target_module, target, self._bind(target, call, scope, 0))
                parts = self._resolve(construction.args[0], inner) if construction.args else None
                yield self._site(module, call, self._class_name(construction), where, parts)
            elif isinstance(call.func, ast.Name) and call.func.id == "print" and call.args:
                parts = self._resolve(call.args[0], scope)
                if parts is not None and _is_notice(call, parts):
                    if parts and isinstance(parts[0], str) and parts[0].startswith("error: "):
                        parts = [parts[0][len("error: ") :], *parts[1:]]
                    site = self._site(module, call, NOTICE, where, parts)
                    if site.resolved:
                        yield site

    def _site(self, module: _Module, call: ast.Call, kind: str, where: str, parts) -> Site:
        return Site(module.path, call.lineno, kind, where, _normalise(parts or [Hole()]))


def package_sources(root: str = PACKAGE) -> dict[str, str]:
    """Every ``.py`` file under ``root``: path relative to root's parent -> source text."""
    sources = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        for filename in sorted(filenames):
            if filename.endswith(".py"):
                path = os.path.join(dirpath, filename)
                with open(path, encoding="utf-8") as f:
                    sources[os.path.relpath(path, os.path.dirname(root))] = f.read()
    return sources


def _last_name(node: ast.expr) -> str | None:
    """``X`` of ``X`` or ``a.b.X``."""
    return node.id if isinstance(node, ast.Name) else getattr(node, "attr", None)


def _module_name(path: str) -> str:
    return os.path.splitext(path)[0].replace(os.sep, ".").removesuffix(".__init__")


def _calls(tree: ast.Module) -> Iterator[tuple[ast.FunctionDef | None, ast.Call]]:
    """Every call with its innermost enclosing function."""

    def visit(node: ast.AST, function):
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            if isinstance(child, ast.Call):
                yield function, child
            yield from visit(child, inner)

    yield from visit(tree, None)


def _is_notice(call: ast.Call, parts) -> bool:
    to_stderr = any(k.arg == "file" and ast.unparse(k.value) == "sys.stderr" for k in call.keywords)
    first = parts[0] if parts else None
    return to_stderr or (isinstance(first, str) and first.startswith("nothing to do"))


def _printf(text: str) -> Parts:
    parts: Parts = []
    last = 0
    for m in _PRINTF.finditer(text):
        parts.append(text[last : m.start()])
        parts.append("%" if m.group() == "%%" else Hole())
        last = m.end()
    return parts + [text[last:]]


def _format(text: str, keywords: dict) -> Parts:
    parts: Parts = []
    for literal, field, _spec, _conversion in string.Formatter().parse(text):
        parts.append(literal)
        if field is not None:
            parts += keywords.get(field, [Hole()]) if field else [Hole()]
    return parts


def unresolved(sites: Iterable[Site], explained: dict = UNRESOLVED) -> list[Site]:
    """Sites whose message has no fixed text and that ``explained`` does not list."""
    return [s for s in sites if not s.resolved and (s.path, s.function) not in explained]


def parse_rows(markdown: str) -> list[Row]:
    """The messages of every table in ``markdown`` whose first header cell is ``Message``."""
    rows, in_table, previous = [], False, ""
    for number, line in enumerate(markdown.splitlines(), start=1):
        stripped = line.strip()
        if not stripped.startswith("|"):
            in_table = False
        elif re.fullmatch(r"\|[\s|:-]+", stripped):
            in_table = _cells(previous)[:1] == ["Message"]
        elif in_table:
            cell = _cells(stripped)[0]
            for span in _SPAN.finditer(cell):
                text = span.group(2)
                if text.startswith(" ") and text.endswith(" ") and text.strip():
                    text = text[1:-1]
                rows.append(Row(number, " ".join(text.replace("\\|", "|").split())))
        previous = stripped
    return rows


def _cells(line: str) -> list[str]:
    return [c.strip() for c in _CELL_SPLIT.split(line.strip().strip("|"))]


def pattern(site: Site) -> re.Pattern:
    """The rows that document ``site``: its fixed text, one placeholder per ``{…}``."""
    return re.compile(_PLACEHOLDER.join(re.escape(fixed) for fixed in site.template.split(HOLE)))


def check(sites: list[Site], rows: list[Row]) -> tuple[list[Site], list[Row]]:
    """``(sites no row documents, rows that match no site)``."""
    patterns = [(site, pattern(site)) for site in sites if site.resolved]
    undocumented = [s for s, p in patterns if not any(p.fullmatch(r.message) for r in rows)]
    stale = [r for r in rows if not any(p.fullmatch(r.message) for _, p in patterns)]
    return undocumented, stale


def report(doc: str, sites: list[Site], rows: list[Row]) -> list[str]:
    """The check's findings as lines; empty when the page and the code agree."""
    undocumented, stale = check(sites, rows)
    lines = []
    if undocumented:
        lines.append(f"{doc}: {len(undocumented)} message(s) in the code have no row:")
        lines += [f"  {site}" for site in undocumented]
    if stale:
        lines.append(f"{doc}: {len(stale)} row(s) match no message in the code:")
        lines += [f"  {doc}:{row.line}: `{row.message}`" for row in stale]
    bad = unresolved(sites)
    stale_reasons = [
        key for key in UNRESOLVED if not any((s.path, s.function) == key for s in sites)
    ]
    if stale_reasons:
        lines.append("moco_d2.error_catalog.UNRESOLVED lists sites that are gone:")
        lines += [f"  {path} {function}" for path, function in stale_reasons]
    if bad:
        lines.append(
            f"{len(bad)} message site(s) have no fixed text; resolve them or list them in "
            "moco_d2.error_catalog.UNRESOLVED with the reason:"
        )
        lines += [f"  {site}" for site in bad]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", metavar="DOC", help="compare DOC (docs/errors.md) with the code")
    args = parser.parse_args(argv)
    sites = Catalog.from_package().sites()
    if not args.check:
        for site in sites:
            print(site)
        return 0
    with open(args.check, encoding="utf-8") as f:
        rows = parse_rows(f.read())
    lines = report(args.check, sites, rows)
    for line in lines:
        print(line)
    if lines:
        return 1
    print(f"{args.check}: {len(rows)} rows cover the {len(sites)} message sites of the code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
