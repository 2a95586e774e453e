"""Every relative link in README.md and docs/, and every docs/ path named in the code, exists.

Markdown links are resolved against the file that holds them (anchors dropped); a path such as
``docs/design/heap.md`` in a comment or docstring is resolved against the repository root. A
renamed or removed document then fails here instead of leaving readers a dead reference.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOCS_PATH = re.compile(r"(?<![\w/.-])(docs/[\w./-]*\w)")
SOURCE_SUFFIXES = {".py", ".c", ".h", ".sh", ".md", ".toml", ".service", ".yaml", ".js", ".html"}


def tracked_files() -> list[Path]:
    """Files git tracks (or would: untracked and not ignored), so build outputs are not read."""
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in listing.splitlines() if (ROOT / line).is_file()]


def markdown_files() -> list[Path]:
    return [p for p in tracked_files() if p.suffix == ".md" and (p.parent == ROOT or "docs" in p.parts)]


def broken_markdown_links(doc: Path) -> list[str]:
    """Relative link targets of ``doc`` that name no existing file or folder."""
    broken = []
    for target in MARKDOWN_LINK.findall(doc.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor within the page
        if not (doc.parent / target.split("#", 1)[0]).exists():
            broken.append(target)
    return broken


def broken_docs_paths(text: str, root: Path = ROOT) -> list[str]:
    """``docs/...`` paths named in ``text`` that do not exist under ``root``."""
    return [path for path in DOCS_PATH.findall(text) if not (root / path).exists()]


def test_markdown_links_resolve() -> None:
    docs = markdown_files()
    assert any(p.name == "README.md" for p in docs) and len(docs) > 5
    broken = [f"{doc.relative_to(ROOT)}: {target}" for doc in docs for target in broken_markdown_links(doc)]
    assert not broken, "dead links:\n" + "\n".join(broken)


def test_docs_paths_named_in_code_exist() -> None:
    sources = [p for p in tracked_files() if p.suffix in SOURCE_SUFFIXES and "vendor" not in p.parts
               and p != Path(__file__).resolve()]
    broken = [f"{source.relative_to(ROOT)}: {path}" for source in sources
              for path in broken_docs_paths(source.read_text(errors="replace"))]
    assert not broken, "references to missing docs:\n" + "\n".join(broken)


def test_checker_reports_dead_links_only(tmp_path: Path) -> None:
    (tmp_path / "present.md").write_text("")
    doc = tmp_path / "x.md"
    doc.write_text("[gone](nowhere/missing.md) [ok](present.md#part) [web](https://example.org) [here](#top)\n")
    assert broken_markdown_links(doc) == ["nowhere/missing.md"]
    assert broken_docs_paths("see docs/design/gone.md, docs/design/heap.md and mydocs/x") == ["docs/design/gone.md"]
