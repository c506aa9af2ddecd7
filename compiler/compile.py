"""The compile pipeline: policy files -> evaluation -> Spec -> lint -> golden requests -> Bundle.

    PolicySource --evaluate--> Evaluation --build_spec--> Spec --lint_spec--> findings
                                                           |--run_request_tests--> findings
                                                           `--(no errors)--> Bundle bytes + digest

Each stage either returns its product and findings or stops the pipeline with error
findings; nothing is emitted when any error was found (DESIGN.md: `compile` writes
nothing on errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from starmesh.bundle.canonical import Bundle, BundleSource, encode_bundle
from starmesh.bundle.decide import DecisionTable, run_request_tests
from starmesh.bundle.errors import BundleError
from starmesh.bundle.gcpause import paused_gc
from starmesh.bundle.spec import SourceLocation
from starmesh.compiler.build import build_spec
from starmesh.compiler.diagnostics import Finding, sort_findings
from starmesh.compiler.errors import EvaluationError
from starmesh.compiler.evaluate import Limits, evaluate
from starmesh.compiler.lint import lint_spec
from starmesh.compiler.source import PolicySource, read_commit, read_directory

__all__ = ["CompileResult", "compile_commit", "compile_source", "compile_tree"]


@dataclass(frozen=True)
class CompileResult:
    """What compiling produced: findings always; the bundle only when there were no errors."""

    source: PolicySource
    findings: list[Finding] = field(default_factory=list)
    bundle: Bundle | None = None
    data: bytes | None = None
    digest: str | None = None

    @property
    def errors(self) -> int:
        return sum(1 for f in self.findings if f.severity == "error")

    @property
    def warnings(self) -> int:
        return sum(1 for f in self.findings if f.severity == "warning")

    @property
    def ok(self) -> bool:
        """True when a bundle was produced (there may still be warnings)."""
        return self.bundle is not None


def compile_source(source: PolicySource, limits: Limits | None = None) -> CompileResult:
    """Compile a policy tree that has already been read."""
    # Every stage builds large acyclic object graphs: collect once, afterwards.
    with paused_gc():
        return _compile(source, limits)


def _compile(source: PolicySource, limits: Limits | None) -> CompileResult:
    try:
        evaluation = evaluate(source, limits)
    except EvaluationError as exc:
        return CompileResult(source, sort_findings(list(exc.findings)))

    built = build_spec(evaluation)
    findings = list(built.findings)
    spec = built.spec
    if spec is None:
        return CompileResult(source, sort_findings(findings))

    findings.extend(lint_spec(spec))
    if any(f.severity == "error" for f in findings):
        # Unknown services or versions: the route table cannot be built, and golden
        # requests against it would only repeat those errors.
        return CompileResult(source, sort_findings(findings))
    try:
        table = DecisionTable.build(spec)
    except BundleError as exc:
        where = spec.source_map.get("mesh", SourceLocation(file=source.entry, line=1))
        findings.append(Finding.at(where, "SM103", "error", f"policy cannot be turned into a route table: {exc}"))
        return CompileResult(source, sort_findings(findings))
    for failure in run_request_tests(table):
        where = spec.source_map.get(failure.location_key) or spec.source_map.get(
            "mesh", SourceLocation(file=source.entry, line=1)
        )
        findings.append(
            Finding.at(where, "SM501", "error", failure.message, "fix the policy or the expectation of this request_test")
        )

    findings = sort_findings(findings)
    if any(f.severity == "error" for f in findings):
        return CompileResult(source, findings)

    bundle = Bundle(source=BundleSource(commit=source.commit, path=source.entry), spec=spec)
    data, digest = encode_bundle(bundle)
    return CompileResult(source, findings, bundle, data, digest)


def compile_tree(root: Path, entry: str = "mesh.star", limits: Limits | None = None) -> CompileResult:
    """Compile the policy files in a directory (outside Git: `source.commit` is null).

    Raises `SourceError` when the tree cannot be read (missing root or entry)."""
    return compile_source(read_directory(root, entry), limits)


def compile_commit(
    repo: Path, rev: str = "HEAD", subdir: str = "", entry: str = "mesh.star", limits: Limits | None = None
) -> CompileResult:
    """Compile the policy files at one Git commit (read from the commit, not the work tree)."""
    return compile_source(read_commit(repo, rev, subdir, entry), limits)
