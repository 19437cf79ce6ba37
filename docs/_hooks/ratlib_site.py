"""MkDocs hooks for ratlib's site (``mkdocs.yml``: ``hooks:``). Four jobs, each one function below:

- The README (as the home page), the CHANGELOG and the examples' READMEs join the pages of ``docs/``, so
  every page a reader of the repository sees is on the site too (``on_files``).
- A link between files of the repository is written for GitHub (``docs/comm.md``, ``../examples/x/README.md``);
  on the site it points to that file's page, or to the repository for a file that has no page (a YAML
  config, a test folder). A link to a file that does not exist is a warning, so ``--strict`` fails on it
  (``on_page_markdown``).
- The API reference pages are the ``reference/ratlib.X.md`` entries of the nav, made here (one ``::: ratlib.X``
  each): adding a module to the reference is one line in ``mkdocs.yml`` (``on_files``).
- A public function, class or method without a docstring, in a module of the reference, is a warning
  (``on_pre_build``): mkdocstrings would show its signature alone, without a word about it.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("mkdocs.plugins.ratlib")

# Repository files outside docs/ that are pages of the site: repository path -> path in the site.
EXTRA_PAGES = {"README.md": "index.md", "CHANGELOG.md": "changelog.md"}
EXTRA_PAGES.update(
    {
        f"examples/{p.parent.name}/README.md": f"examples/{p.parent.name}-readme.md"
        for p in ROOT.glob("examples/*/README.md")
    }
)
REFERENCE = re.compile(r"^reference/(ratlib(?:\.\w+)*)\.md$")
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")
FENCE = re.compile(r"^\s*(```|~~~)")


def _nav_paths(nav: Any) -> list[str]:
    """Every page path of the nav in mkdocs.yml (nested lists of ``{title: path-or-list}``)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_paths(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_paths(value)]
    return []


def reference_modules(config: Any) -> list[str]:
    """The modules that have an API reference page, in nav order."""
    return [m.group(1) for p in _nav_paths(config["nav"]) if (m := REFERENCE.match(p))]


def on_files(files: Files, config: Any) -> Files:
    for repo_path, site_path in EXTRA_PAGES.items():
        files.append(
            File.generated(config, site_path, abs_src_path=str(ROOT / repo_path))  # edits go to the real file
        )
    for module in reference_modules(config):
        content = f"# `{module}`\n\n::: {module}\n"
        files.append(File.generated(config, f"reference/{module}.md", content=content))
    return files


def _repo_path(site_path: str) -> str:
    """The repository file a page of the site comes from."""
    for repo_path, extra in EXTRA_PAGES.items():
        if extra == site_path:
            return repo_path
    return f"docs/{site_path}"


def _rewrite(target: str, page_repo: str, page_site: str, config: Any) -> str:
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return target
    path, hash_, anchor = target.partition("#")
    repo_target = posixpath.normpath(posixpath.join(posixpath.dirname(page_repo), path))
    site_target = EXTRA_PAGES.get(repo_target)
    if site_target is None and repo_target.startswith("docs/"):
        site_target = repo_target[len("docs/") :]
        if not (ROOT / repo_target).exists():
            return target  # mkdocs names the broken link (a warning, so --strict fails)
    if site_target is not None:
        return posixpath.relpath(site_target, posixpath.dirname(page_site)) + hash_ + anchor
    if not (ROOT / repo_target).exists():
        log.warning("%s links to %r, which is not a file of the repository (%s)", page_repo, target, repo_target)
        return target
    kind = "tree" if (ROOT / repo_target).is_dir() else "blob"
    return f"{config['repo_url'].rstrip('/')}/{kind}/main/{repo_target}{hash_}{anchor}"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    page_site = page.file.src_uri
    page_repo = _repo_path(page_site)
    out, in_code = [], False
    for line in markdown.split("\n"):
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            line = LINK.sub(
                lambda m: m.group(1) + _rewrite(m.group(2), page_repo, page_site, config) + m.group(3), line
            )
        out.append(line)
    return "\n".join(out)


def on_pre_build(config: Any) -> None:
    """A warning for every public function, class, method or property without a docstring."""
    import griffe

    package = griffe.load("ratlib", search_paths=[str(ROOT)], resolve_aliases=False)
    for name in reference_modules(config):
        module = package if name == "ratlib" else package[name.removeprefix("ratlib.")]
        for path in undocumented(module):
            log.warning("%s has no docstring (the API reference would show its signature alone)", path)


def undocumented(obj: Any) -> list[str]:
    """The public names defined in ``obj`` (a griffe module or class) that have no docstring. Submodules
    are left to their own reference page; imported names (aliases) to the module that defines them."""
    found = []
    for name, member in obj.members.items():
        if member.is_alias or member.is_module or member.is_attribute or name.startswith("_"):
            continue
        if obj.is_module and not member.is_public:
            continue
        if not member.docstring:
            found.append(member.path)
        if member.is_class:
            found.extend(undocumented(member))
    return found


def on_serve(server: Any, config: Any, builder: Any) -> Any:
    """``mkdocs serve`` rebuilds when a docstring or a page outside docs/ changes, too."""
    for path in [ROOT / "ratlib", *(ROOT / p for p in EXTRA_PAGES)]:
        server.watch(os.fspath(path))
    return server
