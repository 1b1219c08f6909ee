"""The documentation stands on its own: every `.md` file the repository mentions exists in it.

A user who clones the repository must not find references to pages that are not there. Every text
file of the repository (what `git ls-files` lists, plus untracked files git does not ignore) is
scanned for tokens ending in `.md`, such as `docs/paper.md` or `README.md`. A reference resolves if
the file exists relative to the repository root, to the referencing file's folder, or to `docs/`;
the names of generated Markdown outputs (`GENERATED`, e.g. the evaluation report) are not references.
Mentions of the private notes folder the project was developed from are refused outright.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".cfg", ".yml", ".yaml"}
TEXT_NAMES = {"Makefile"}
# Folders a plain walk skips when git is not available (outputs, caches, environments).
SKIP_DIRS = {".git", ".venv", ".cache", "demo_out", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"}

# A path-like token ending in ".md" that is not part of a longer word ("x.mdl") and that has a name
# before the suffix (so "*.md" or "{name}.md" templates are not references).
MD_TOKEN = re.compile(r"(?<![\w./-])([\w./-]*\w\.md)(?!\w)")
URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
# Markdown files the project writes as outputs (tools/evaluate/make_report.py), not pages of the repository.
GENERATED = {"report.md"}
# Spelled in pieces so that this file does not mention them itself.
FORBIDDEN = ("../" + "shared", "shared" + "/docs")


def repository_files(root: Path = REPO) -> list[Path]:
    """Text files of the repository: tracked and untracked-but-not-ignored (git), else a plain walk."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=root, capture_output=True, text=True, check=True, timeout=60,
        ).stdout.splitlines()  # fmt: skip
        candidates = [root / name for name in listed]
    except (OSError, subprocess.SubprocessError):
        candidates = [
            p for p in root.rglob("*") if not any(part in SKIP_DIRS or part.endswith(".egg-info") for part in p.parts)
        ]
    files = {p for p in candidates if (p.suffix in TEXT_SUFFIXES or p.name in TEXT_NAMES) and p.is_file()}
    return sorted(files)


def md_references(text: str) -> list[tuple[int, str]]:
    """(line number, token) of every `.md` reference in a text, URLs left out."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for match in MD_TOKEN.finditer(URL.sub(" ", line)):
            found.append((number, match.group(1)))
    return found


def resolves(token: str, referrer: Path, root: Path) -> bool:
    """Whether the token names a file inside the repository (a path leading out of it does not count)."""
    root = root.resolve()
    for base in (root, referrer.parent, root / "docs"):
        target = (base / token).resolve()
        if target.is_relative_to(root) and target.is_file():
            return True
    return False


def dead_references(files: list[Path], root: Path) -> list[str]:
    """`file:line: reference` for every `.md` reference that names no file of the repository."""
    dead = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, token in md_references(text):
            if Path(token).name not in GENERATED and not resolves(token, path, root):
                dead.append(f"{path.relative_to(root)}:{number}: {token}")
    return dead


def forbidden_mentions(files: list[Path], root: Path) -> list[str]:
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            for word in FORBIDDEN:
                if word in line:
                    found.append(f"{path.relative_to(root)}:{number}: {word}")
    return found


def test_every_md_reference_exists():
    files = repository_files()
    assert any(p.name == "README.md" for p in files), "the scan found no README.md: is the file list right?"
    dead = dead_references(files, REPO)
    assert not dead, "references to .md files that are not in the repository:\n" + "\n".join(dead)


def test_no_mention_of_private_notes():
    found = forbidden_mentions(repository_files(), REPO)
    assert not found, "mentions of a folder outside the repository:\n" + "\n".join(found)


def test_scanner_tells_dead_from_live_references(tmp_path):
    md = ".md"  # the fixture's names are built from this, so that this file holds no dead reference itself
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / f"guide{md}").write_text("# guide\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / f"notes{md}").write_text("# notes\n")
    source = tmp_path / "pkg" / "mod.py"
    source.write_text(
        f'"""See docs/guide{md}, guide{md} (under docs/), notes{md} (beside this file).\n'
        f"Templates are not references: {{name}}{md}, *{md}; nor URLs: https://example.org/GONE{md}\n"
        f'Dead: GONE{md} and docs/missing{md}, also `(../other/README{md})`."""\n'
    )
    assert md_references(f"x{md}l y{md}_z") == []
    assert dead_references([source], tmp_path) == [
        f"pkg/mod.py:3: GONE{md}",
        f"pkg/mod.py:3: docs/missing{md}",
        f"pkg/mod.py:3: ../other/README{md}",
    ]
    (tmp_path / "pkg" / "bad.sh").write_text("cp " + FORBIDDEN[1] + "/x .\n")
    assert forbidden_mentions([tmp_path / "pkg" / "bad.sh"], tmp_path) == ["pkg/bad.sh:1: " + FORBIDDEN[1]]
