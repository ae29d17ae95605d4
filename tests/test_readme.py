"""The README's "Guarantees and limits" names real tests: every `file.py::test_name` it cites exists."""

import pathlib
import re

ROOT = pathlib.Path(__file__).parents[1]
# `test_x.py::test_y`, `test_x.py` or `::test_y` (the last file named); a trailing * matches a prefix.
CITATION = re.compile(r"`(test_\w+\.py)?(?:::(test_\w+\*?))?`")


def test_guarantees_cite_existing_tests():
    section = (ROOT / "README.md").read_text().split("## Guarantees and limits", 1)[1].split("\n## ", 1)[0]
    files = {path.name: path.read_text() for path in (ROOT / "tests").rglob("test_*.py")}
    current, cited = None, 0
    for file, name in CITATION.findall(section):
        if file:
            assert file in files, f"README cites {file}, which is not in tests/"
            current = file
        if name:
            assert current is not None, f"README cites ::{name} before naming its file"
            pattern = re.escape(name.rstrip("*")) + (r"\w*" if name.endswith("*") else r"\b")
            assert re.search(rf"^def {pattern}", files[current], re.MULTILINE), f"{current}::{name} does not exist"
            cited += 1
    assert cited >= 20
