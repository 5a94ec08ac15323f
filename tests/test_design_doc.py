"""The design document ships with the code and stays true to it: every NOTE block in the sources
is listed in docs/design.md's index under a file that holds it, and every section the code cites exists."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "design.md"
SOURCES = ("python", "csrc", "scripts", "benchmarks", "tests", "examples")
SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".sh"}

if not DOC.is_file():  # an installed copy of the tests without the repository around it
    pytest.skip("docs/design.md is not beside these tests", allow_module_level=True)


def _source_files():
    files = [ROOT / "CMakeLists.txt"]
    for top in SOURCES:
        files += [p for p in (ROOT / top).rglob("*") if p.suffix in SUFFIXES and "results" not in p.parts]
    return files


def _note_names(text):
    # A name may wrap onto the next comment line: join "[first\n  // rest]" into "first rest".
    names = set()
    for m in re.finditer(r"NOTE:? \[([^\]]+)\]", text):
        names.add(re.sub(r"\s*\n\s*(?:#:|#|//|\*)?\s*", " ", m.group(1)).strip())
    return names


def _index():
    doc = DOC.read_text()
    index = doc[doc.index("## 7. Index of NOTE blocks"):]
    return re.findall(r"^\| \[([^\]]+)\] \| `([^`]+)` \|", index, flags=re.M)


def test_every_index_entry_names_a_file_that_holds_the_note():
    entries = _index()
    assert len(entries) > 40
    stale = [(name, path) for name, path in entries
             if not (ROOT / path).is_file() or name not in _note_names((ROOT / path).read_text())]
    assert not stale, f"docs/design.md index entries whose file does not hold the NOTE: {stale}"


def test_every_note_in_the_sources_is_in_the_index():
    indexed = {name for name, _ in _index()}
    missing = {}
    for path in _source_files():
        for name in _note_names(path.read_text()) - indexed:
            missing.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not missing, f"NOTE blocks missing from docs/design.md's index: {missing}"


def test_cited_sections_exist():
    headings = set(re.findall(r"^#+ (\d+(?:\.\d+)?)[ .]", DOC.read_text(), flags=re.M))
    cited = {}
    for path in _source_files() + [ROOT / "README.md"]:
        for m in re.finditer(r"docs/design\.md(?: section)? (\d+(?:\.\d+)?)(?:-(\d+(?:\.\d+)?))?", path.read_text()):
            for number in filter(None, m.groups()):
                cited.setdefault(number, []).append(str(path.relative_to(ROOT)))
    absent = {number: where for number, where in cited.items() if number not in headings}
    assert cited and not absent, f"sections of docs/design.md cited but absent: {absent}"
