"""The measured durations behind ``make test-fast``: tests that took at least :data:`LONG_SECONDS` get the ``long``
marker at collection (tests/conftest.py), and ``make test-fast`` leaves out ``slow`` and ``long`` alike.

Re-measure after adding tests (a quiet machine, one thread, the whole fast set):

    OMP_NUM_THREADS=1 python -m pytest -m "not slow" --durations=0 > durations.log
    python tests/helpers/durations.py durations.log

which rewrites tests/data/durations.json with every test's setup + call + teardown seconds at or over the bound.
"""
from __future__ import annotations

import collections
import json
import pathlib
import re
import sys

LONG_SECONDS = 1.0
FILE = pathlib.Path(__file__).resolve().parents[1] / "data" / "durations.json"
_LINE = re.compile(r"\s*([\d.]+)s (?:setup|call|teardown)\s+(\S+)")


def long_tests() -> dict[str, float]:
    """Node id -> measured seconds of the tests over the bound (empty when the file is missing)."""
    if not FILE.is_file():
        return {}
    return json.loads(FILE.read_text())


def record(logs: list[pathlib.Path]) -> dict[str, float]:
    seconds: collections.Counter[str] = collections.Counter()
    for log in logs:
        for line in log.read_text().splitlines():
            match = _LINE.match(line)
            if match:
                seconds[match.group(2)] += float(match.group(1))
    return {node: round(total, 2) for node, total in sorted(seconds.items()) if total >= LONG_SECONDS}


if __name__ == "__main__":
    found = record([pathlib.Path(arg) for arg in sys.argv[1:]])
    FILE.write_text(json.dumps(found, indent=1) + "\n")
    print(f"{len(found)} tests of {LONG_SECONDS} s or more in {FILE}")
