"""What ``diagnose`` reports: findings with their file and line, the files checked and skipped, fixes made."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ratlib.config_defaults import Finding

__all__ = ["Report", "Reported"]

_Severity = Literal["error", "warning", "info"]  # Finding.severity


@dataclass(frozen=True)
class Reported:
    """A finding with the file (and line, when known) it is about."""

    path: str
    line: int | None
    finding: Finding

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.finding}"


@dataclass
class Report:
    """What ``diagnose`` found, changed (with ``fix``) and saw of the environment."""

    findings: list[Reported] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    skipped_why: dict[str, str] = field(default_factory=dict)
    studies: dict[str, str] = field(default_factory=dict)  # study file -> the schema it was validated with
    examples: dict[str, str] = field(default_factory=dict)  # config -> the schema of the EXAMPLE beside it
    changes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)

    def count(self, severity: str) -> int:
        """How many findings have this severity (``"error"``, ``"warning"``, ``"info"``)."""
        return sum(r.finding.severity == severity for r in self.findings)

    def add(
        self, path: Path | str, severity: _Severity, key: str, message: str, advice: str, line: int | None = None
    ) -> None:
        """Record a finding about ``path`` (and its ``line``, where known)."""
        finding = Finding(severity, key, message, advice)
        self.findings.append(Reported(str(path), line, finding))

    def skip(self, path: Path | str, why: str) -> None:
        """Record a file that was not checked, and why (the report names every one)."""
        self.skipped.append(str(path))
        self.skipped_why[str(path)] = why
