"""The Starlark interpreter for policies, run inside the evaluation worker.

Each policy file becomes one module: a generated prelude defines a Starlark wrapper
per builtin (so `call_stack()` shows where the user called it), then the file's own
code runs. Every wrapper calls the native `_starmesh_call`, which records a `Call`
and hands it back as an opaque value, so nested builtin calls arrive as `Call`s
inside their parent's arguments. `load()` goes through one reader with a module cache
and cycle detection; files are only ever read from the request, never from disk.
"""

from __future__ import annotations

import time
from typing import Any, NoReturn

import starlark as sl

from starmesh.compiler._eval_bounds import BoundExceeded, OutputMeter
from starmesh.compiler._eval_errors import finding_from_error, refine_syntax_position
from starmesh.compiler._eval_labels import LIBRARY_PREFIX, LabelError, display_label, resolve_label
from starmesh.compiler._eval_locate import PRELUDE_FILE, Locator, parse_frames
from starmesh.compiler._eval_protocol import WorkerRequest, WorkerResult
from starmesh.compiler.builtins import BUILTINS
from starmesh.compiler.calls import Call
from starmesh.compiler.diagnostics import Finding

__all__ = ["PRELUDE", "run"]

_NATIVE = "_starmesh_call"

PRELUDE = "".join(
    f"def {name}(*args, **kwargs):\n    return {_NATIVE}({name!r}, call_stack(), args, kwargs)\n\n"
    for name in BUILTINS
) + "def print(*args, **kwargs):\n    return None\n"
"""One wrapper per builtin; `print` is accepted and does nothing (evaluation is silent)."""

_EXTENSIONS = [
    sl.LibraryExtension.CallStack,
    sl.LibraryExtension.StructType,
    sl.LibraryExtension.RecordType,
    sl.LibraryExtension.EnumType,
    sl.LibraryExtension.Map,
    sl.LibraryExtension.Filter,
    sl.LibraryExtension.Partial,
    sl.LibraryExtension.Json,
    sl.LibraryExtension.Debug,
    sl.LibraryExtension.Typing,
]
"""Pure extensions only: no Print/Pprint (stdout), Breakpoint (stdin) or Internal."""


def _dialect() -> sl.Dialect:
    dialect = sl.Dialect.standard()
    dialect.enable_top_level_stmt = True
    dialect.enable_f_strings = True
    return dialect


class _Stop(Exception):
    """Evaluation stopped; the reason is the interpreter's `failure` or `pending_load`."""


def _memory_message(limit: str) -> str:
    return f"policy evaluation exceeded the memory limit of {limit}"


_MEMORY_HINT = "a value grew too large: look for a list or string multiplied by a huge number, or a runaway loop"


class _Interpreter:
    def __init__(self, request: WorkerRequest) -> None:
        self.request = request
        self.limits = request.limits
        self.locator = Locator(request.files, request.library)
        self.globals = sl.Globals.extended_by(_EXTENSIONS)
        self.dialect = _dialect()
        self.deadline = time.monotonic() + self.limits.time_seconds
        self.options = sl.EvalOptions(check_cancelled=self._cancelled, max_callstack_size=self.limits.call_depth)
        self.cache: dict[str, sl.FrozenModule] = {}
        self.loaded: list[str] = []
        self.declarations: list[Call] = []
        self.meter = OutputMeter(self.limits)
        self.failure: Finding | None = None
        self.pending_load: tuple[str, str, str | None] | None = None
        self.current = request.entry

    def _cancelled(self) -> bool:
        return time.monotonic() > self.deadline

    def run(self) -> WorkerResult:
        try:
            self._evaluate(self.request.entry, (self.request.entry,))
        except _Stop:
            pass
        except MemoryError:
            self._fail_at_file("SM106", _memory_message(self.limits.describe_memory()), _MEMORY_HINT)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # pyo3's PanicException derives from BaseException
            self._panicked(exc)
        if self.failure is not None:
            return WorkerResult((), tuple(self.loaded), (self.failure,))
        return WorkerResult(tuple(self.declarations), tuple(self.loaded), ())

    # -- failures -------------------------------------------------------------------

    def _fail(self, finding: Finding) -> NoReturn:
        if self.failure is None:
            self.failure = finding
        raise _Stop(finding.message)

    def _fail_at_file(self, code: str, message: str, hint: str | None = None) -> None:
        if self.failure is None:
            self.failure = Finding(self.current, 1, 1, code, "error", message, hint)

    def _panicked(self, exc: BaseException) -> None:
        text = str(exc)
        if "memory" in text or "must not exceed" in text or "capacity overflow" in text:
            self._fail_at_file("SM106", _memory_message(self.limits.describe_memory()), _MEMORY_HINT)
        else:
            self._fail_at_file("SM103", f"the Starlark interpreter failed: {text[:200]}")

    def _error(self, exc: sl.StarlarkError, text: str | None = None) -> NoReturn:
        """Stops on a starlark error; `text` is the file's source when parsing failed."""
        if self.failure is not None:
            raise _Stop(self.failure.message)
        finding = finding_from_error(
            str(exc),
            self.locator,
            self.current,
            syntax=text is not None,
            time_limit=self.limits.time_seconds,
            call_depth=self.limits.call_depth,
        )
        if text is not None:
            finding = refine_syntax_position(finding, text)
        elif self.pending_load is not None:
            code, message, hint = self.pending_load
            self.pending_load = None
            finding = Finding(finding.file, finding.line, finding.col, code, "error", message, hint)
        self._fail(finding)

    # -- modules and load() --------------------------------------------------------------

    def _module(self) -> sl.Module:
        module = sl.Module()
        module.add_callable(_NATIVE, self._call)
        sl.eval(module, sl.parse(PRELUDE_FILE, PRELUDE, self.dialect), self.globals)
        return module

    def _evaluate(self, key: str, chain: tuple[str, ...]) -> sl.FrozenModule:
        if key not in self.loaded:
            self.loaded.append(key)
        text = self.request.library[key] if key.startswith(LIBRARY_PREFIX) else self.request.files[key]
        importer, self.current = self.current, key
        try:
            try:
                ast = sl.parse(key, text, self.dialect)
            except sl.StarlarkError as exc:
                self._error(exc, text)
            module = self._module()
            loader = sl.FileLoader(lambda label: self._load(label, chain))
            try:
                sl.eval_with(self.options, module, ast, self.globals, loader)
            except sl.StarlarkError as exc:
                self._error(exc)
            return module.freeze()
        finally:
            self.current = importer

    def _load(self, label: str, chain: tuple[str, ...]) -> sl.FrozenModule:
        importer = chain[-1]
        try:
            key = resolve_label(label, self.request.files, self.request.library)
        except LabelError as err:
            self.pending_load = ("SM104", err.message, err.hint)
            raise _Stop(err.message) from None
        if importer.startswith(LIBRARY_PREFIX) and not key.startswith(LIBRARY_PREFIX):
            self.pending_load = ("SM104", f"the starmesh library file {importer} cannot load {label!r}", None)
            raise _Stop("library load")
        if key in chain:
            cycle = " -> ".join(display_label(k, self.request.entry) for k in (*chain, key))
            self.pending_load = ("SM105", f"load cycle: {cycle}", "move what these files share into a file none of them loads back")
            raise _Stop("load cycle")
        cached = self.cache.get(key)
        if cached is None:
            try:
                cached = self.cache[key] = self._evaluate(key, (*chain, key))
            except _Stop:
                raise
            except MemoryError:
                self._fail_at_file("SM106", _memory_message(self.limits.describe_memory()), _MEMORY_HINT)
                raise _Stop("memory") from None
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # a panic inside the loaded file
                self._panicked(exc)
                raise _Stop("panic") from None
        return cached

    # -- builtin calls ------------------------------------------------------------------

    def _call(self, name: str, stack: str, args: list[Any], kwargs: dict[str, Any]) -> sl.OpaquePythonObject:
        try:
            location, via = self.locator.locate(name, parse_frames(stack), self.current)
            args_t = tuple(args)
            try:
                depth = self.meter.measure(name, [args_t, kwargs])
            except BoundExceeded as exc:
                self._fail(Finding.at(location, "SM106", "error", exc.message, exc.hint))
            call = Call(name, args_t, dict(kwargs), location, via)
            self.meter.made(call, depth)
            if BUILTINS[name].declares:
                self.declarations.append(call)
                if len(self.declarations) > self.limits.max_declarations:
                    self._fail(
                        Finding.at(
                            location,
                            "SM106",
                            "error",
                            f"the policy declares more than {self.limits.max_declarations} objects",
                            "split the mesh, or look for a loop that declares without end",
                        )
                    )
            return sl.OpaquePythonObject(call)
        except MemoryError:
            self._fail_at_file("SM106", _memory_message(self.limits.describe_memory()), _MEMORY_HINT)
            raise _Stop("memory") from None


def run(request: WorkerRequest) -> WorkerResult:
    """Evaluates the request's entry file (and what it loads) and reports what it declared."""
    return _Interpreter(request).run()
