"""Benchmark fixtures: ``device`` is cpu, plus cuda when present."""

import pytest
from _common import DEVICES


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
