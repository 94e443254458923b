"""Which transformers Mamba-1 / Falcon-Mamba code actually runs.

modeling_mamba and modeling_falcon_mamba (5.23 to 5.25) route the conv and the selective scan through
kernel dispatchers: decorated module-level functions that bind mamba_ssm / causal_conv1d kernels when
those import (5.25 adds `causal_conv1d_forward` and `mamba_scan_forward`, which own the cache
handling). Even on the torch path the scan is not one algorithm: the torch body of
`mamba_selective_scan` picks mambapy's parallel `pscan` (use_mambapy and mambapy importable), torch's
`associative_scan` (use_associative_scan, only while torch.compile traces) or a sequential loop over
time. The reference is defined as that sequential loop on the torch path, and this module makes sure
it is what ran, the way equiv_reference/provenance.py does for Mamba-2:

1. import: `import_modeling(model_type)` imports the module with the kernel packages hidden;
2. call time: `DispatchRecorder` swaps every decorated function for a shim that runs its torch body
   (found by `equiv_reference.provenance.torch_body`: `__wrapped__` or recompiled from source) and
   counts the call. The scan's body runs under a line tracer confined to its own frame, so the branch
   that executed is observed, not inferred from the config or the installed packages;
3. `require_called` / `require_sequential_scan` turn any other outcome into one ReferenceChanged line.

Which functions are dispatched, and the scan's three branches, are read from the module's source; a
release that restructures them is refused by name instead of being half-recorded.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import sys
from collections import Counter

from equiv.errors import ConfigError, ReferenceChanged
from equiv_reference import provenance as prov

MODULES = {"mamba": "transformers.models.mamba.modeling_mamba",
           "falcon_mamba": "transformers.models.falcon_mamba.modeling_falcon_mamba"}
CLASSES = {"mamba": ("MambaConfig", "MambaForCausalLM"),
           "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM")}

SCAN = "mamba_selective_scan"
STATE_UPDATE = "mamba_selective_state_update"
DISPATCHED = {  # function -> the provenance key
    SCAN: "scan",
    STATE_UPDATE: "state_update",
    "causal_conv1d_fn": "conv",
    "causal_conv1d_update": "conv_update",
    "mamba_inner_fn": "fused_training_path",  # Mamba only; its torch body returns None
    "causal_conv1d_forward": "conv_forward",  # 5.25
    "mamba_scan_forward": "scan_forward",  # 5.25
}
REQUIRED = (SCAN, STATE_UPDATE, "causal_conv1d_fn", "causal_conv1d_update")

SEQUENTIAL = "sequential loop"
PSCAN = "mambapy parallel scan (pscan)"
ASSOCIATIVE = "torch associative_scan"

_IMPORT_RECORD: dict[str, dict] = {}


def short(mm) -> str:
    return mm.__name__.rsplit(".", 1)[-1]


def import_modeling(model_type: str):
    """transformers' module for `model_type` ("mamba" / "falcon_mamba"), imported with the kernel
    packages hidden if this is the first import in the process."""
    if model_type not in MODULES:
        raise ConfigError(f"model_type: expected one of {sorted(MODULES)}, got {model_type!r}")
    name = MODULES[model_type]
    if name not in sys.modules:
        installed = {p: prov.package_installed(p) for p in prov.KERNEL_PACKAGES}
        try:
            with prov.kernel_packages_hidden():
                mm = importlib.import_module(name)
        except ImportError as e:
            raise prov.reference_changed(f"cannot import {name} ({e})") from None
        _IMPORT_RECORD[name] = {"first_import": "equiv_reference.mamba1.provenance (kernel packages hidden)",
                                "kernel_packages_installed": installed}
    else:
        mm = sys.modules[name]
        _IMPORT_RECORD.setdefault(name, {
            "first_import": "elsewhere in the process, before the reference loaded",
            "kernel_packages_installed": {p: prov.package_installed(p) for p in prov.KERNEL_PACKAGES}})
    return mm


def import_record(mm) -> dict:
    return dict(_IMPORT_RECORD.get(mm.__name__, {}))


def _scan_node(mm) -> ast.FunctionDef | None:
    try:
        tree = ast.parse(inspect.getsource(mm), filename=mm.__file__)
    except (OSError, TypeError, SyntaxError) as e:
        raise prov.reference_changed(f"cannot read the source of {mm.__name__} ({e})") from None
    return next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == SCAN), None)


def _lines(stmts: list[ast.stmt]) -> range:
    return range(stmts[0].lineno, stmts[-1].end_lineno + 1)


@functools.cache
def scan_branches(mm) -> dict[str, range]:
    """{branch: its source lines} of the scan's `if use_mambapy ...: elif use_associative_scan ...:
    else: <for loop>`, read from the module's source (line numbers of the file the body runs from)."""
    node = _scan_node(mm)
    for stmt in node.body if node is not None else []:
        if not (isinstance(stmt, ast.If) and "use_mambapy" in ast.unparse(stmt.test)):
            continue
        inner = stmt.orelse[0] if len(stmt.orelse) == 1 and isinstance(stmt.orelse[0], ast.If) else None
        if (inner is not None and "use_associative_scan" in ast.unparse(inner.test) and inner.orelse
                and any(isinstance(s, ast.For) for s in inner.orelse)):
            return {PSCAN: _lines(stmt.body), ASSOCIATIVE: _lines(inner.body),
                    SEQUENTIAL: _lines(inner.orelse)}
    raise prov.reference_changed(
        f"{mm.__name__}.{SCAN} no longer has the expected `if use_mambapy: pscan / elif "
        "use_associative_scan: associative_scan / else: for-loop over time` structure, so the scan that "
        "runs cannot be identified")


class DispatchRecorder:
    """Context manager: while active, each dispatched function of the module runs its torch body and is
    counted, and each scan call records which branch executed. `listener(name, args, kwargs)`, when
    set, sees every call first (the runner captures the scan's arguments through it). `substitutes`
    runs other functions in place of named torch bodies (training's O(l)-backward scan), recorded as such."""

    def __init__(self, mm, substitutes: dict | None = None):
        self.mm = mm
        self.substitutes = dict(substitutes or {})  # name -> a function run instead of the torch body
        self.names = prov.dispatched_names(mm, REQUIRED)
        self.bodies = {name: prov.torch_body(mm, name) for name in self.names}
        self.branches = scan_branches(mm)
        self.bound = {name: prov.bound_implementation(getattr(mm, name, None)) for name in self.names}
        self.calls = dict.fromkeys(self.names, 0)
        self.scan_runs: Counter = Counter()
        self.listener = None
        self._saved: dict = {}
        self._at_enter = (dict(self.calls), Counter(self.scan_runs))

    def _label(self, name: str) -> str:
        """A substitute's importable name (its module's spec name when it runs as __main__)."""
        fn = self.substitutes[name]
        spec = getattr(sys.modules.get(fn.__module__), "__spec__", None)
        return f"{getattr(spec, 'name', None) or fn.__module__}.{fn.__qualname__}"

    def torch_body(self, name: str):
        return self.bodies[name][0]

    def _traced_scan(self, body, args, kwargs):
        """Runs the scan's body with a line tracer on its frame only; counts the branch it took."""
        code, seen = body.__code__, set()

        def local(frame, event, arg):
            if event == "line":
                seen.add(frame.f_lineno)
            return local

        previous = sys.gettrace()  # a coverage or debugger tracer pauses for this call only
        sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)
        try:
            out = body(*args, **kwargs)
        finally:
            sys.settrace(previous)
        taken = [b for b, lines in self.branches.items() if seen.intersection(lines)]
        self.scan_runs[taken[0] if len(taken) == 1 else f"unidentified (lines {sorted(seen)})"] += 1
        return out

    def _shim(self, name):
        body = self.substitutes.get(name, self.torch_body(name))
        params = inspect.signature(body).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())

        def shim(*args, **kwargs):
            self.calls[name] += 1
            # the dispatcher drops kwargs its implementation does not accept; do the same
            kwargs = kwargs if takes_any else {k: v for k, v in kwargs.items() if k in params}
            if self.listener is not None:
                self.listener(name, args, kwargs)
            if name == SCAN and name not in self.substitutes:
                return self._traced_scan(body, args, kwargs)
            return body(*args, **kwargs)

        return shim

    def __enter__(self):
        self._at_enter = (dict(self.calls), Counter(self.scan_runs))
        for name in self.names:
            self._saved[name] = getattr(self.mm, name)
            setattr(self.mm, name, self._shim(name))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(self.mm, name, fn)
        self._saved.clear()
        return False

    def calls_in_last_block(self, name: str) -> int:
        return self.calls.get(name, 0) - self._at_enter[0].get(name, 0)

    def require_called(self, *names: str, what: str) -> None:
        """Each of `names` ran at least once in the last `with` block, else the model took a path
        around the functions this recorder controls."""
        missing = [n for n in names if self.calls_in_last_block(n) == 0]
        if missing:
            raise prov.reference_changed(f"{what} never called {short(self.mm)}.{missing[0]}: the model runs "
                                         "code this suite does not control")

    def require_sequential_scan(self, what: str) -> None:
        """Every scan of the last `with` block took the sequential loop."""
        runs = self.scan_runs - self._at_enter[1]
        other = sorted(b for b in runs if b != SEQUENTIAL)
        if other:
            import transformers

            raise ReferenceChanged(
                f"transformers {transformers.__version__}: {what} ran {other[0]} in "
                f"{short(self.mm)}.{SCAN}; expected its {SEQUENTIAL} over time on the torch path, which is "
                "what this suite defines as the reference (a checkpoint with use_mambapy=True and mambapy "
                "installed, or a torch.compile'd model, takes another branch)")

    def record(self) -> dict:
        functions = {}
        for name in self.names:
            bound = self.bound[name]
            ran = f"substitute {self._label(name)}" if name in self.substitutes else "torch fallback"
            functions[DISPATCHED.get(name, name)] = {
                "function": f"{short(self.mm)}.{name}",
                "ran": ran if self.calls[name] else "not called",
                "calls": self.calls[name], "bound_at_import": bound,
                "torch_body": self.bodies[name][1],
                **({} if name in DISPATCHED else {"note": "dispatched function unknown to the tested "
                                                          "releases; its torch body ran"})}
        runs = dict(sorted(self.scan_runs.items()))
        if SCAN in self.substitutes and self.calls[SCAN]:
            runs[f"substitute {self._label(SCAN)} (not traced)"] = self.calls[SCAN]
        return {"functions": functions,
                "scan": {"function": f"{short(self.mm)}.{SCAN}",
                         "implementation": (next(iter(runs)) if len(runs) == 1
                                            else "not run yet" if not runs else "mixed: " + ", ".join(runs)),
                         "calls_by_branch": runs,
                         "detected_by": "a line tracer on the scan body's frame while it ran",
                         "branch_lines": {b: [r.start, r.stop - 1] for b, r in self.branches.items()}}}
