"""docs/errors.md against the code: the message extractor, the row parser and the check."""

import os
import subprocess
import sys
import textwrap

import pytest

from moco_d2 import error_catalog as ec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "errors.md")
ERRORS = "class UserError(Exception):\n    pass\n"


def read_doc() -> str:
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def templates(source: str, **more: str) -> list[str]:
    """The templates of ``moco_d2/m.py`` = ``source`` (with ``moco_d2/errors.py`` and the
    other modules in ``more``, named as dotted paths under moco_d2)."""
    sources = {"moco_d2/errors.py": ERRORS, "moco_d2/m.py": textwrap.dedent(source)}
    sources.update({f"moco_d2/{k}.py": textwrap.dedent(v) for k, v in more.items()})
    return [s.template for s in ec.Catalog(sources).sites() if s.path == "moco_d2/m.py"]


@pytest.fixture(scope="module")
def package_sites() -> list[ec.Site]:
    return ec.Catalog.from_package().sites()


def table(*messages: str) -> str:
    rows = "".join(f"| {m} | meaning | fix |\n" for m in messages)
    return f"# t\n\n| Message | Meaning | Fix |\n|---|---|---|\n{rows}"


# (a) the repository: docs and code agree, both ways


def test_docs_match_code():
    result = subprocess.run(
        [sys.executable, "-m", "moco_d2.error_catalog", "--check", DOC],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sites = ec.Catalog.from_package().sites()
    assert ec.report("docs/errors.md", sites, ec.parse_rows(read_doc())) == []
    assert len(sites) > 100


def test_package_catalog_finds_known_sites(package_sites):
    sites = {(s.path, s.template) for s in package_sites}
    for expected in [
        ("moco_d2/weights.py", "no such file: {…}"),
        # TrainingDiverged, a subclass in another module, with its message from a helper
        (
            "moco_d2/pretrain/engine.py",
            "non-finite loss ({…}) at epoch {…}, {…}, lr {…}: lower --lr, check the data, or "
            "try without --amp; the last checkpoint is intact",
        ),
        # a factory (invalid) called with an f-string reason
        (
            "moco_d2/detection/data/coco_check.py",
            'not a valid COCO instances file {…}: image id {…} appears twice in "images"',
        ),
        # a module constant filled in with .format
        (
            "moco_d2/weights.py",
            "refused to load {…}: it is a JAX/Haiku checkpoint pickled with dill ({…}.{…}), as "
            "DeepMind's BYOL release is, and unpickling it can run arbitrary code; convert it "
            "to a PyTorch state_dict with the published conversion "
            "(github.com/ajtejankar/byol-convert) and pass that file",
        ),
        ("moco_d2/cli.py", "interrupted"),
        ("moco_d2/training/cli_args.py", "expected {…}, got {…}"),
    ]:
        assert expected in sites


# (b) the extractor, shape by shape


def test_literal_and_implicit_concatenation():
    source = """
    from moco_d2.errors import UserError

    def f():
        raise UserError("one " "two")
    """
    assert templates(source) == ["one two"]


def test_fstring_parts_are_holes():
    source = """
    from moco_d2.errors import UserError

    def f(path, n, x):
        raise UserError(f"{path!r} has {n:d} items, {x.y} and {len(x)}{n} more")
    """
    assert templates(source) == ["{…} has {…} items, {…} and {…} more"]


def test_plus_percent_and_format():
    source = """
    from moco_d2.errors import UserError

    _HINT = "see {path} or {other}"

    def f(path, problems):
        raise UserError("problems: " + "; ".join(problems))

    def g(n):
        raise UserError("got %d of %s (100%%)" % (n, "x"))

    def h(path):
        raise UserError(_HINT.format(path=path, other=f"{path}.bak"))
    """
    assert templates(source) == ["problems: {…}", "got {…} of {…} (100%)", "see {…} or {…}.bak"]


def test_variable_constant_and_imported_constant_are_inlined():
    source = """
    from moco_d2.errors import UserError
    from moco_d2.hints import HINT

    SUFFIX = "(local)"

    def f(path):
        message = f"bad {path}; {HINT} {SUFFIX}"
        raise UserError(message)

    def g(path):
        message = "first"
        message = "second"
        raise UserError(f"{message} {path}")
    """
    hints = 'HINT = "set X"\n'
    assert templates(source, hints=hints) == ["bad {…}; set X (local)", "{…} {…}"]


def test_subclass_in_another_module_and_message_helper():
    diverged = """
    from moco_d2.errors import UserError

    class Diverged(UserError):
        pass

    class Exploded(Diverged):
        pass
    """
    source = """
    from moco_d2.stop import Exploded

    def _where(first, last):
        return f"iterations {first}-{last} of the run"

    def f(a, b):
        raise Exploded(_where(a, b))

    def g():
        raise ValueError("not a user error")
    """
    assert templates(source, stop=diverged) == ["iterations {…}-{…} of the run"]


def test_factory_sites_are_its_calls_with_arguments_filled_in():
    source = """
    from moco_d2.errors import UserError

    def _invalid(path, why):
        return UserError(f"invalid file {path}: {why}")

    def f(path, what):
        raise _invalid(path, f"{what} is not a list")

    def g(path):
        raise _invalid(path, "empty")
    """
    sites = ec.Catalog(
        {"moco_d2/errors.py": ERRORS, "moco_d2/m.py": textwrap.dedent(source)}
    ).sites()
    assert [(s.line, s.kind, s.function, s.template) for s in sites] == [
        (8, "UserError", "f", "invalid file {…}: {…} is not a list"),
        (11, "UserError", "g", "invalid file {…}: empty"),
    ]


def test_notices():
    source = """
    import sys

    def f(e, n):
        print(f"error: {e}", file=sys.stderr)
        print("error: the tool is missing", file=sys.stderr)
        print(f"nothing to do: {n} done")
        print(f"progress {n}")
    """
    sites = ec.Catalog({"moco_d2/m.py": textwrap.dedent(source)}).sites()
    assert [(s.kind, s.template) for s in sites] == [
        (ec.NOTICE, "the tool is missing"),
        (ec.NOTICE, "nothing to do: {…} done"),
    ]


def test_unresolved_sites_are_reported_unless_explained():
    source = """
    from moco_d2.errors import UserError

    def f(e):
        raise UserError(str(e))
    """
    sites = ec.Catalog(
        {"moco_d2/errors.py": ERRORS, "moco_d2/m.py": textwrap.dedent(source)}
    ).sites()
    assert [(s.template, s.resolved) for s in sites] == [("{…}", False)]
    assert ec.unresolved(sites, {}) == sites
    assert ec.unresolved(sites, {("moco_d2/m.py", "f"): "relays a checked message"}) == []
    assert any("no fixed text" in line for line in ec.report("doc", sites, []))


# (c) the check, on rows and code that disagree


def site(message: str) -> list[ec.Site]:
    """The sites of one ``raise UserError(message)``, ``message`` as source code."""
    source = "from moco_d2.errors import UserError\n\ndef f(a, b):\n    raise UserError(" + message
    source += ")\n"
    return ec.Catalog({"moco_d2/errors.py": ERRORS, "moco_d2/m.py": source}).sites()


@pytest.mark.parametrize(
    "row, documented",
    [
        ("`--lr A must be positive, got B`", True),
        ("`--lr ... must be positive, got LR`", True),
        ("`--lr A must be  positive,  got B`", True),  # whitespace runs are one space
        ("`--lr A must be positive`", False),  # shortened
        ("`--lr A must be positive, got -1.0`", False),  # an example value
        ("`--lr A must be positive, got lr`", False),  # a placeholder is ALL-CAPS
        ("`--lr A must be positive, got LEARNING`", True),
        ("`--lr A must be positive, got LEARNINGR`", False),  # 9 letters
        ("`--lr A must be positive, got B` (exit 0)", True),
        ("`other` / `--lr A must be positive, got B`", True),
        ("``--lr A must be positive, got B``", True),
    ],
)
def test_row_matching(row, documented):
    sites = site('f"--lr {a} must be positive, got {b}"')
    undocumented, stale = ec.check(sites, ec.parse_rows(table(row)))
    assert (not undocumented) == documented
    if not documented:
        assert len(stale) == 1


def test_rows_only_from_message_tables_with_spans_and_escapes():
    markdown = table("``run `make` now``", r"`a \| b`", "no span here") + (
        "\n| Name | Value |\n|---|---|\n| `not a message` | x |\n"
    )
    rows = ec.parse_rows(markdown)
    assert [(r.line, r.message) for r in rows] == [(5, "run `make` now"), (6, "a | b")]


def test_removed_row_reported_with_file_and_line(package_sites):
    doc = read_doc()
    row = next(line for line in doc.splitlines() if line.startswith("| `no such file: F`"))
    lines = ec.report("docs/errors.md", package_sites, ec.parse_rows(doc.replace(row + "\n", "")))
    weights = {s.template: s.line for s in package_sites if s.path == "moco_d2/weights.py"}
    missing = ["{…} is a directory, not a weights file", "no such file: {…}"]
    assert lines == ["docs/errors.md: 2 message(s) in the code have no row:"] + [
        f"  moco_d2/weights.py:{weights[t]}: [UserError] {t}" for t in missing
    ]


def test_shortened_row_reported_as_stale(package_sites):
    doc = read_doc()
    full = "`SOLVER.STEPS STEPS must be positive and strictly increasing`"
    assert full in doc
    shortened = doc.replace(full, "`SOLVER.STEPS STEPS must be positive`")
    rows = ec.parse_rows(shortened)
    undocumented, stale = ec.check(package_sites, rows)
    assert [r.message for r in stale] == ["SOLVER.STEPS STEPS must be positive"]
    assert [s.path for s in undocumented] == ["moco_d2/detection/preflight.py"]
    line = shortened.splitlines().index(
        next(x for x in shortened.splitlines() if "STEPS must be positive`" in x)
    )
    assert stale[0].line == line + 1


def test_new_code_message_without_row_is_reported():
    sources = ec.package_sources()
    sources["moco_d2/weights.py"] += (
        "\n\ndef _refuse(path):\n    raise UserError(f'{path} is a brand-new mistake')\n"
    )
    sites = ec.Catalog(sources).sites()
    undocumented, stale = ec.check(sites, ec.parse_rows(read_doc()))
    assert [(s.path, s.template) for s in undocumented] == [
        ("moco_d2/weights.py", "{…} is a brand-new mistake")
    ]
    assert stale == []
