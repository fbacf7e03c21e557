"""A plot axis's values are counted against the cell cap as they are read, not after: a body of
many small ranges (16 MB of ``"1-100"`` is two million of them, each a hundred values) is
refused at once instead of being expanded into hundreds of millions of values first, which
took the dashboard down for memory. The parse runs in a process of its own with its address
space capped (512 MB), as a dashboard with a memory limit would."""

from __future__ import annotations

import subprocess
import sys

import pytest

from renderfarm.errors import InvalidJob
from renderfarm.plots import parse_plot

JOB = {"prompt": "a red barn", "model": "tiny", "width": 64, "height": 64, "steps": 2}

PARSE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (512 * 2**20, 512 * 2**20))
from renderfarm.errors import InvalidJob
from renderfarm.plots import parse_plot
axes = {"x": {"field": "seed", "values": ["1-100"] * 100_000}}
try:
    parse_plot(axes, {"prompt": "a", "model": "tiny"}, 100)
except InvalidJob as exc:
    print(exc.errors[0].field)
"""


def test_many_ranges_are_refused_before_they_are_expanded():
    done = subprocess.run([sys.executable, "-c", PARSE], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() == "axes.x.values"


def test_an_axis_over_the_cap_by_its_ranges_names_the_axis():
    with pytest.raises(InvalidJob) as refused:
        parse_plot({"x": {"field": "steps", "values": ["1-40", "1-40", "1-40"]}}, JOB, 100)
    error = refused.value.errors[0]
    assert error.field == "axes.x.values" and "100" in error.message, str(error)
