"""An mkdocs hook for the links from a page to the rest of the repository.

The pages link to files outside docs/ (``[RESULTS.md](../benchmarks/RESULTS.md)``) the way GitHub
reads them, relative to the page's file, so that they work there and in an editor. mkdocs looks
for such a target among the pages and warns, which fails the strict build. This hook takes these
links before mkdocs sees them: a target missing from the repository fails the build, as a broken
page link does; an existing one points at the repository, at ``repo_url`` when mkdocs.yml sets
one, otherwise at the file in the clone, relative to the built page (the site is built inside the
clone).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

# A Markdown inline link whose target climbs out of docs/; the text may hold code, not brackets.
LINK = re.compile(r"\[(?P<text>[^\]\n]+)\]\((?P<path>\.\./[^)\s#]*)(?P<anchor>#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, **kwargs: Any) -> str:
    docs = Path(config.docs_dir).resolve()
    root = Path(config.config_file_path).resolve().parent
    page_dir = (docs / page.file.src_uri).parent
    built_dir = (Path(config.site_dir).resolve() / page.file.dest_uri).parent

    def repository_link(m: re.Match[str]) -> str:
        target = (page_dir / m["path"]).resolve()
        if target.is_relative_to(docs):  # a page or file of the site: mkdocs checks it
            return m[0]
        if not target.is_relative_to(root) or not target.exists():
            where, link = page.file.src_uri, m["path"]
            raise PluginError(f"{where}: the link to {link!r} leads to no file of the repository")
        anchor = m["anchor"] or ""
        if config.repo_url:
            kind = "tree" if target.is_dir() else "blob"
            url = f"{config.repo_url.rstrip('/')}/{kind}/HEAD/{target.relative_to(root).as_posix()}"
            return f"[{m['text']}]({url}{anchor})"
        # Inline HTML: mkdocs checks Markdown links only, and this one leaves the site.
        href = Path(os.path.relpath(target, built_dir)).as_posix()
        return f'<a href="{href}{anchor}">{m["text"]}</a>'

    out, in_fence = [], False
    for line in markdown.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        out.append(line if in_fence else LINK.sub(repository_link, line))
    return "\n".join(out)
