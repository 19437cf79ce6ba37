"""A griffe extension (``mkdocs.yml``: the mkdocstrings handler's ``extensions``): the Sphinx roles ratlib's
docstrings use (``:func:`save```, ``:class:`CheckpointError```) become links of the API reference. A short
name is looked up in the docstring's own module, then in its class; a name that leads nowhere is left to
autorefs, which warns about it (so ``mkdocs build --strict`` fails on a stale name). reST's ``text::`` before
an indented example loses a colon: the indented block is already code in Markdown."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`~?([\w.]+)`")
LITERAL = re.compile(r"(?<=\S)::$", re.M)


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        """Once the whole package is loaded, so that a class's methods are there to be found."""
        _rewrite(pkg)


def _rewrite(obj: Any) -> None:
    if obj.docstring is not None and ":" in obj.docstring.value:
        text = ROLE.sub(lambda m: _link(m.group(1), obj), obj.docstring.value)
        obj.docstring.value = LITERAL.sub(":", text)
    for member in obj.members.values():
        if not member.is_alias:
            _rewrite(member)


def _link(name: str, obj: Any) -> str:
    if name.startswith("ratlib."):
        return f"[`{name}`][{name}]"
    module = obj if obj.is_module else obj.module
    scopes = [module.path]
    if obj.is_class:
        scopes.insert(0, obj.path)
    elif obj.parent is not None and obj.parent.is_class:
        scopes.insert(0, obj.parent.path)
    for scope in scopes:
        head = name.split(".", 1)[0]
        owner = module if scope == module.path else obj if obj.is_class else obj.parent
        if head in owner.members:
            return f"[`{name}`][{scope}.{name}]"
    return f"[`{name}`][{module.path}.{name}]"
