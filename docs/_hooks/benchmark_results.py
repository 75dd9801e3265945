"""MkDocs hook: serve the measured figures in benchmarks/results/ with the site.

The pages link to the figures the way they lie in the repository, relative to docs/
(``![...](../benchmarks/results/compare-<machine>-<date>.png)``, as ``python -m benchmarks.compare``
writes it), so the links work when the Markdown is read on a code host. MkDocs only knows the
files under docs/, so this hook adds every image in benchmarks/results/ to the site as
``benchmarks/results/<name>`` and points those links there. A link to a figure that does not
exist still fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = (".png", ".svg", ".jpg")
LINK = re.compile(r"\]\((?:\.\./)+benchmarks/results/")


def on_files(files, config):
    for path in sorted(RESULTS.glob("*")) if RESULTS.is_dir() else []:
        if path.suffix in IMAGES:
            files.append(File(f"benchmarks/results/{path.name}", str(ROOT), config["site_dir"],
                              config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    # ../benchmarks/results/x.png from docs/<page>.md  ->  the copy served at the site root
    depth = page.file.src_uri.count("/")
    return LINK.sub("](" + "../" * depth + "benchmarks/results/", markdown)
