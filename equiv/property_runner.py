"""Running a family's algorithm property suite outside pytest, as the main job does: the hypothesis
settings, the one-line failure detail, the worst budget ratio each property saw, and the verdict
in the schema every family's suite returns (equiv.check.run_property_suite reads it):

    {"verdict": "pass" | "fail", "properties_run", "properties_passed", "properties_failed",
     "examples": total executions (a failed property's include the shrinker's attempts),
     "examples_per_property", "references": references.provenance(),
     "properties": [{"name", "verdict", "examples", "detail"}], "detail": one line}

With `exact` given (the budget value of properties checked bit for bit), each property's row also
carries "budget", "worst_ratio", "worst_max_ratio" (the largest RMS / max-error ratio its budget
checks reported through `record`; None for an exact property) and "seconds", and the verdict a
total "seconds".
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator

from hypothesis import HealthCheck, Phase, settings


def runner_settings(examples_per_property: int) -> settings:
    """Deterministic hypothesis settings for the main job: derandomized, no database, no deadline
    (the first example of each bucket pays the compiles), one failure per property, shrunk before it
    is reported (shrinking runs only after a failure, so a passing suite costs nothing more; the
    report then names the simplest counterexample hypothesis found)."""
    return settings(max_examples=examples_per_property, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow],
                    phases=(Phase.explicit, Phase.generate, Phase.shrink),
                    report_multiple_bugs=False, print_blob=False)


_FAILING_PREFIXES = ("Failing test case", "Failing explicit example", "Falsifying example",
                     "Falsifying explicit example")
"""How hypothesis introduces the falsifying example in the notes of the exception it re-raises
(6.1xx says "Failing ...", older releases "Falsifying ...")."""
_GENERIC_HEADERS = ("Arrays are not equal", "Not equal to tolerance")


def failure_detail(exc: BaseException) -> str:
    """One line: the failure's first line and the falsifying example hypothesis attached to it."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    first = lines[0] if lines else "(no message)"
    if first.startswith(_GENERIC_HEADERS) and len(lines) > 1:  # numpy.testing: the err_msg is next
        first = f"{first}: {lines[1]}"
    head = f"{type(exc).__name__}: {first}"
    for note in getattr(exc, "__notes__", ()) or ():
        if note.startswith(_FAILING_PREFIXES):
            call = re.sub(r"\s+", " ", note.split(":", 1)[1]).strip()
            call = call.replace("( ", "(").replace(",)", ")").replace(", )", ")")
            return f"{head} [falsifying example: {call}]"
    return head


def replayed(exc: BaseException) -> bool:
    """Whether hypothesis replayed the falsifying example after drawing it (a drawn example is
    replayed once for the report, without shrinking; a failing explicit example is not)."""
    notes = getattr(exc, "__notes__", ()) or ()
    return any(n.startswith(("Failing test case", "Falsifying example")) for n in notes)


# ---------------------------------------------------------------------------------------------
# the worst ratio seen


class RatioLog:
    """The largest RMS and max-error ratios the budget checks saw while it was active."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.worst_max = 0.0

    def record(self, ratio: float, ratio_max: float) -> None:
        self.worst = max(self.worst, float(ratio))
        self.worst_max = max(self.worst_max, float(ratio_max))


_ACTIVE: list[RatioLog] = []


@contextlib.contextmanager
def recording(log: RatioLog) -> Iterator[RatioLog]:
    """Every budget check inside the block records its ratios in `log`."""
    _ACTIVE.append(log)
    try:
        yield log
    finally:
        _ACTIVE.remove(log)


def record(ratio: float, ratio_max: float) -> None:
    """A budget check's ratios, into every active RatioLog."""
    for log in _ACTIVE:
        log.record(ratio, ratio_max)


# ---------------------------------------------------------------------------------------------
# the runner


def run_properties(properties, references, hypothesis_test, examples_per_property: int, *, label: str,
                   strict: Callable[[], contextlib.AbstractContextManager],
                   progress: Callable[[str], None] | None = None, exact=None) -> dict:
    """Each of `properties` (objects with .name, and .budget when `exact` is given) as
    hypothesis_test(prop, references, settings, on_example=...)() on `examples_per_property` drawn
    examples, inside `strict()`; the verdict in the module's schema. A property that raises anything
    (a failed check, an unexpected exception, a health check) is a failure with its message; the
    runner itself does not raise. `label` prefixes the progress lines ("SSD property ...")."""
    test_settings = runner_settings(examples_per_property)
    rows = []
    start = time.perf_counter()
    with strict():
        for prop in properties:
            if progress is not None:
                progress(f"{label} {prop.name} ...")
            count = [0]

            def tick(count=count):
                count[0] += 1

            log, t0 = RatioLog(), time.perf_counter()
            try:
                with recording(log):
                    hypothesis_test(prop, references, test_settings, on_example=tick)()
            except Exception as exc:  # any failure is the property's verdict
                row = {"name": prop.name, "verdict": "fail", "examples": count[0] - replayed(exc),
                       "detail": failure_detail(exc)}
            else:
                row = {"name": prop.name, "verdict": "pass", "examples": count[0], "detail": ""}
            if exact is not None:
                budgeted = prop.budget != exact
                row.update(budget=prop.budget, worst_ratio=round(log.worst, 4) if budgeted else None,
                           worst_max_ratio=round(log.worst_max, 4) if budgeted else None,
                           seconds=round(time.perf_counter() - t0, 3))
            rows.append(row)
    passed = sum(r["verdict"] == "pass" for r in rows)
    examples = sum(r["examples"] for r in rows)
    failed = [r["name"] for r in rows if r["verdict"] != "pass"]
    try:
        provenance = references.provenance()
    except Exception as exc:  # reported, not fatal
        provenance = {"name": getattr(references, "name", "?"), "error": f"{type(exc).__name__}: {exc}"}
    detail = f"{passed}/{len(rows)} properties, {examples} examples, budget from {references.name} float32"
    if failed:
        detail += f"; failed: {', '.join(failed)}"
    timed = {} if exact is None else {"seconds": round(time.perf_counter() - start, 3)}
    return {
        "verdict": "pass" if not failed else "fail",
        "properties_run": len(rows),
        "properties_passed": passed,
        "properties_failed": len(failed),
        "examples": examples,
        "examples_per_property": examples_per_property,
        "references": provenance,
        **timed,
        "properties": rows,
        "detail": detail,
    }
