"""The child process of tests/test_hostile_inputs.py: runs a list of cases through `equiv.cli.main`
in this one process (one interpreter start and one JAX/torch import for a whole class of cases)
and reports, per case, the exit code, stderr, the tail of stdout, the seconds it took and this
process's peak RSS so far.

    python tests/hostile_child.py CASES.json RESULTS.json

CASES.json: {"cases": [{"id", "argv", "timeout"}], "address_space": bytes or null}. The results are
rewritten after every case, so a child killed from outside still reports how far it got. Each
case runs under an alarm (a hang becomes a "timeout" result, not a stuck test), and the address
space is capped (a regression that allocates without bound fails here instead of exhausting the
machine). ru_maxrss is a high-water mark: the case that raised it is the one that used the memory.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import signal
import sys
import time
import traceback
from pathlib import Path


class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException, so no `except Exception` in the code under test eats it."""


def _alarm(signum, frame):
    raise CaseTimeout


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out_path = Path(sys.argv[2])
    cap = spec.get("address_space")
    if cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from equiv.cli import main as equiv_main

    signal.signal(signal.SIGALRM, _alarm)
    report = {"baseline_maxrss_kb": _maxrss_kb(), "results": []}
    for case in spec["cases"]:
        err, out = io.StringIO(), io.StringIO()
        rc, crash = None, ""
        t0 = time.monotonic()
        signal.alarm(int(case.get("timeout", 60)))
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                rc = equiv_main(list(case["argv"]))
        except CaseTimeout:
            crash = "timeout: the case did not finish"
        except BaseException:  # noqa: BLE001 - recorded: the test fails on it, naming the case
            crash = traceback.format_exc()
        finally:
            signal.alarm(0)
        report["results"].append({"id": case["id"], "rc": rc, "crash": crash, "stderr": err.getvalue(),
                                  "stdout_tail": out.getvalue()[-4000:],
                                  "seconds": round(time.monotonic() - t0, 3), "maxrss_kb": _maxrss_kb()})
        out_path.write_text(json.dumps(report))
    out_path.write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
