"""docs/errors.md quotes messages by a fragment of their text: a message reworded or removed in
the code must take its row along, or the page sends users looking for a line they never see."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The first cell of a table row: one message fragment in backticks.
ROW = re.compile(r"^\| `([^`]+)` \|", re.MULTILINE)


def package_strings() -> list[str]:
    """Every string literal of the package. The parser joins implicitly concatenated literals
    into one node, and an f-string's literal parts are string constants of their own, so a
    fragment is found whether or not a line break or a placeholder sits beside it."""
    strings = []
    for path in sorted((ROOT / "moco_d2").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        strings += [
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        ]
    return strings


def test_every_documented_message_is_in_the_code():
    fragments = ROW.findall((ROOT / "docs" / "errors.md").read_text(encoding="utf-8"))
    assert len(fragments) >= 25, f"only {len(fragments)} rows parsed from docs/errors.md"
    strings = package_strings()
    missing = [f for f in fragments if not any(f in s for s in strings)]
    assert not missing, f"docs/errors.md quotes messages the code no longer has: {missing}"
