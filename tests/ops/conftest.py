"""Fixtures for the op tests; the helpers they share are in _helpers.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def dynamo_reset():
    """A fresh torch.compile cache before and after the test, so one test's graphs and guards never
    serve another's."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
