"""Generate docs/policy-reference.md from the code, so the reference cannot drift.

The reference is rendered from three sources of truth:

- `compiler/builtins.py`: every builtin, its documentation, each parameter's kind,
  default and documentation, and an example;
- `compiler/codes.py` with `docs/rules/<CODE>/{bad,good}/`: every rule code, its
  severity and title, and its failing and passing example policies, inlined;
- `policies/*.star`: the shipped library's public functions and their docstrings.

    python -m starmesh.compiler.docgen            # write docs/policy-reference.md
    python -m starmesh.compiler.docgen --check    # exit 1 when the file is stale

Output is deterministic: the same code gives the same bytes (no dates, sorted files).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from starmesh.compiler.builtins import BUILTINS, REQUIRED, Builtin, Param
from starmesh.compiler.codes import CODES, Code

__all__ = [
    "LibraryFunction",
    "REFERENCE_PATH",
    "REPO_ROOT",
    "library_functions",
    "main",
    "render_reference",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The source checkout (docgen is a development tool: it reads docs/ and policies/)."""

REFERENCE_PATH = REPO_ROOT / "docs" / "policy-reference.md"
_RULES_DIR = REPO_ROOT / "docs" / "rules"
_LIBRARY_DIR = REPO_ROOT / "policies"

_COMMAND = "python -m starmesh.compiler.docgen"

_KIND_DOCS: dict[str, str] = {
    "string": "any string",
    "bool": "`True` or `False`",
    "int": "an integer (a float with an integral value is accepted)",
    "percent": "a number from 0 to 100",
    "positive_number": "a number greater than 0",
    "duration": 'a duration: an integer with `ms`, `s`, `m` or `h` ("250ms", "2s", "1m"), from 1ms to 24h',
    "duration_or_zero": 'a duration, or "0s"',
    "status": "an HTTP status code",
    "name": "a DNS label (lower-case letters, digits, `-`): service, version and mesh names",
    "domain": "a DNS domain name (the trust domain)",
    "path": 'a URL path starting with "/", without a query string',
    "request_path": 'a URL path starting with "/"; a query string is allowed',
    "path_pattern": 'an exact path, or a prefix when it ends in "*"',
    "regex": "a regular expression that must match the whole value",
    "method": "an HTTP method (upper-cased)",
    "header": "a header name (case-insensitive; lower-cased)",
    "field_value": "a header value",
    "header_value": 'an exact string, `regex("^re$")` or `present()`',
    "weights": "a dict from version to an integer percent; the percents sum to 100",
    "backends": 'a version ("v2"), or a dict from version to percent summing to 100',
    "endpoints": 'a dict from version to a list of "host:port" addresses',
}
"""What each base kind of `compiler/builtins.py` accepts; unknown kinds show their name."""


@dataclass(frozen=True)
class LibraryFunction:
    """A public function of the shipped Starlark library (`policies/NAME.star`)."""

    module: str
    """The file name, e.g. "traffic.star" (loaded as `@starmesh//traffic.star`)."""
    name: str
    signature: str
    """The parameter list as written, e.g. `service, stable, canary, percent`."""
    doc: str
    """The docstring, dedented."""


# ---------------------------------------------------------------------------------------
# Values and kinds
# ---------------------------------------------------------------------------------------


def _literal(value: object) -> str:
    """A Python default as the Starlark literal a user would write."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _split_top(text: str) -> tuple[str, str]:
    """Split `K,V` at its first comma outside brackets."""
    depth = 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            return text[:i], text[i + 1 :]
    return text, ""


def _kind_text(kind: str) -> str:
    """A kind string in words, with builtin values linked to their section."""
    if kind.startswith("list[") and kind.endswith("]"):
        return "list of " + _kind_text(kind[5:-1])
    if kind.startswith("dict[") and kind.endswith("]"):
        key, value = _split_top(kind[5:-1])
        return f"dict from {_kind_text(key)} to {_kind_text(value)}"
    if kind.startswith("value:"):
        name = kind[len("value:") :]
        return f"[`{name}(...)`](#{name})"
    if kind.startswith("enum:"):
        return "one of " + ", ".join(f"`{_literal(c)}`" for c in kind[len("enum:") :].split("|"))
    if kind.startswith("enum_list:"):
        return "list of " + ", ".join(f"`{_literal(c)}`" for c in kind[len("enum_list:") :].split("|"))
    return f"[{kind}](#kind-{kind.replace('_', '-')})" if kind in _KIND_DOCS else f"`{kind}`"


def _base_kinds(kind: str) -> Iterable[str]:
    """The base kinds a (possibly nested) kind string is made of."""
    if kind.startswith("list[") and kind.endswith("]"):
        yield from _base_kinds(kind[5:-1])
    elif kind.startswith("dict[") and kind.endswith("]"):
        key, value = _split_top(kind[5:-1])
        yield from _base_kinds(key)
        yield from _base_kinds(value)
    elif not kind.startswith(("value:", "enum:", "enum_list:")):
        yield kind


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _bounds_text(param: Param) -> str:
    if param.bounds is None:
        return ""
    low, high = param.bounds
    if high >= 2**31 - 1:
        return f" (at least {low})"
    return f" ({low} to {high})"


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------


def _signature(builtin: Builtin) -> str:
    parts = []
    for p in builtin.params:
        parts.append(p.name if p.required else f"{p.name} = {_literal(p.default)}")
    one_line = f"{builtin.name}({', '.join(parts)})"
    if len(one_line) <= 88:
        return one_line
    return f"{builtin.name}(\n" + "".join(f"    {part},\n" for part in parts) + ")"


def _render_builtin(builtin: Builtin) -> list[str]:
    out = [f"### {builtin.name}", "", "```python", _signature(builtin), "```", "", builtin.doc]
    if builtin.declares:
        out += ["", f"Calling `{builtin.name}(...)` declares a policy object; it returns an opaque value."]
    else:
        out += ["", f"Returns a value to pass to another builtin; `{builtin.name}(...)` alone declares nothing."]
    if builtin.params:
        out += ["", "| Parameter | Accepts | Default | Description |", "|---|---|---|---|"]
        for p in builtin.params:
            name = f"`{p.name}`" + (" (or by position)" if p.positional else "")
            default = "required" if p.default is REQUIRED else f"`{_literal(p.default)}`"
            accepts = _kind_text(p.kind) + _bounds_text(p)
            out.append(f"| {name} | {_cell(accepts)} | {_cell(default)} | {_cell(p.doc)} |")
    else:
        out += ["", "No parameters."]
    if builtin.example:
        out += ["", "Example:", "", "```python", builtin.example, "```"]
    return out + [""]


def _render_kinds() -> list[str]:
    used: list[str] = []
    for builtin in BUILTINS.values():
        for p in builtin.params:
            for kind in _base_kinds(p.kind):
                if kind not in used:
                    used.append(kind)
    out = [
        "## Value kinds",
        "",
        "What each parameter accepts. Wrong values are reported with `file:line:col` and a "
        "rule code (see [Lint rules](#lint-rules)).",
        "",
        "| Kind | Accepts |",
        "|---|---|",
    ]
    for kind in sorted(used):
        doc = _KIND_DOCS.get(kind, "see compiler/values.py")
        anchor = f'<a id="kind-{kind.replace("_", "-")}"></a>'
        out.append(f"| {anchor}`{kind}` | {_cell(doc)} |")
    return out + [""]


def _example_files(tree: Path) -> list[Path]:
    return sorted(p for p in tree.rglob("*.star") if p.is_file())


def _render_example(label: str, tree: Path, shown_as: str) -> list[str]:
    files = _example_files(tree) if tree.is_dir() else []
    if not files:
        return [f"{label}: _no example yet_ (`{shown_as}`).", ""]
    out = [f"{label}:", ""]
    for path in files:
        rel = path.relative_to(tree).as_posix()
        if len(files) > 1 or rel != "mesh.star":
            out += [f"`{rel}`", ""]
        text = path.read_text(encoding="utf-8").rstrip("\n")
        out += ["```python", text, "```", ""]
    return out


def _render_code(code: Code, rules_dir: Path) -> list[str]:
    out = [f"### {code.code}", "", f"**{code.severity}**: {code.title}.", ""]
    for label, case in (("Reported for", "bad"), ("Not reported for", "good")):
        out += _render_example(label, rules_dir / code.code / case, f"docs/rules/{code.code}/{case}")
    return out


_DEF = re.compile(r'^def ([A-Za-z][A-Za-z0-9_]*)\((.*?)\):\n    """(.*?)"""', re.MULTILINE | re.DOTALL)


def _dedent_doc(doc: str) -> str:
    lines = doc.split("\n")
    body = [line[4:] if line.startswith("    ") else line.strip() for line in lines[1:]]
    return "\n".join([lines[0].strip(), *body]).strip()


def library_functions(library_dir: Path = _LIBRARY_DIR) -> list[LibraryFunction]:
    """The public (not `_`-prefixed) top-level functions of `policies/*.star`, in file order."""
    found: list[LibraryFunction] = []
    for path in sorted(library_dir.glob("*.star")):
        text = path.read_text(encoding="utf-8")
        for m in _DEF.finditer(text):
            signature = " ".join(m.group(2).split())
            found.append(LibraryFunction(path.name, m.group(1), signature, _dedent_doc(m.group(3))))
    return found


def _render_library(library_dir: Path) -> list[str]:
    out = [
        "## Library",
        "",
        "Macros shipped in `policies/`, loaded as `load(\"@starmesh//NAME.star\", \"name\")`. "
        "A guide with examples is in [policies-library.md](policies-library.md).",
        "",
    ]
    module = None
    for fn in library_functions(library_dir):
        if fn.module != module:
            module = fn.module
            out += [f"### @starmesh//{module}", ""]
        out += [f"#### {fn.name}", "", "```python", f"{fn.name}({fn.signature})", "```", ""]
        out += _render_docstring(fn.doc)
    return out


def _render_docstring(doc: str) -> list[str]:
    """A Google-style docstring as Markdown: prose as is, `Args:` as a list of arguments,
    `Returns:` as one line."""
    out: list[str] = []
    section = ""
    for line in doc.split("\n"):
        if line in ("Args:", "Returns:"):
            section = line
            while out and not out[-1]:
                out.pop()
            out += ["", "**Arguments:**" if line == "Args:" else "**Returns:**"]
            if line == "Args:":
                out.append("")
            continue
        if section == "Args:" and line.startswith("  "):
            arg = re.match(r"^([a-z_][a-z0-9_]*): (.*)$", line.strip())
            if arg and not line.startswith("    "):
                out.append(f"- `{arg.group(1)}`: {arg.group(2)}")
            else:
                out[-1] += " " + line.strip()
            continue
        if section == "Returns:" and line.startswith("  "):
            out[-1] += " " + line.strip()
            continue
        out.append(line)
    return out + [""]


def render_reference(rules_dir: Path = _RULES_DIR, library_dir: Path = _LIBRARY_DIR) -> str:
    """The whole of docs/policy-reference.md, from the builtin table, the rule codes and
    their examples, and the shipped library."""
    codes = sorted(CODES.values(), key=lambda c: c.code)
    out = [
        "# Policy reference",
        "",
        f"<!-- Generated by `{_COMMAND}` from compiler/builtins.py, compiler/codes.py, "
        "docs/rules/ and policies/. Do not edit by hand. -->",
        "",
        "Policy is Starlark: keyword arguments, durations as strings (`\"250ms\"`, `\"2s\"`), "
        "percents as numbers from 0 to 100. Builtins that declare a policy object are "
        "`mesh`, `service`, `http_route`, `authorization` and `request_test`; the others "
        "build values to pass to them.",
        "",
        "## Builtins",
        "",
        " · ".join(f"[`{b.name}`](#{b.name})" for b in BUILTINS.values()),
        "",
    ]
    for builtin in BUILTINS.values():
        out += _render_builtin(builtin)
    out += _render_kinds()
    out += [
        "## Lint rules",
        "",
        "Errors make `starmesh lint` exit 1 and `starmesh compile` write nothing; warnings "
        "fail `lint` only with `--strict`. Each finding carries `file:line:col`, the code, "
        "a message and, where it helps, a hint.",
        "",
        "| Code | Severity | Rule |",
        "|---|---|---|",
    ]
    for code in codes:
        out.append(f"| [{code.code}](#{code.code.lower()}) | {code.severity} | {_cell(code.title)} |")
    out.append("")
    for code in codes:
        out += _render_code(code, rules_dir)
    out += _render_library(library_dir)
    return "\n".join(out).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Write the reference, or with `--check` exit 1 when the file on disk is stale."""
    parser = argparse.ArgumentParser(prog=_COMMAND, description="Generate docs/policy-reference.md.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale; write nothing")
    parser.add_argument("--output", type=Path, default=REFERENCE_PATH, help="where the reference goes")
    args = parser.parse_args(argv)
    output: Path = args.output
    text = render_reference()
    if args.check:
        current = output.read_text(encoding="utf-8") if output.is_file() else None
        if current != text:
            print(f"{output} is stale: run `{_COMMAND}` and commit the result", file=sys.stderr)
            return 1
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(text.encode("utf-8"))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
