"""Test-wide setup.

* NaN poisoning: ``torch.use_deterministic_algorithms(True)`` with
  ``fill_uninitialized_memory`` makes every ``torch.empty`` (from Python and from the C++
  extension's ``at::empty``) return NaN-filled floating-point memory, so a kernel that forgets to
  write an element fails its parity test. ``test_poison_is_active`` proves the poison is on.
* Triton runs under its interpreter (``TRITON_INTERPRET=1``) when there is no GPU; it must be set
  before triton is imported.
* Seeds: each test draws its random inputs from ``crc32(test id) ^ FASTCTX_TEST_SEED`` (default
  0): other inputs for every test, the same ones on every run, so that a failure reproduces
  (Python's ``hash`` of a string, used before, changes per process). Set
  ``FASTCTX_TEST_SEED`` to draw another set; the header of the run shows it.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _poison_uninitialized_memory():
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


TEST_SEED = int(os.environ.get("FASTCTX_TEST_SEED", "0"))


def pytest_report_header(config):
    return f"fastctx: FASTCTX_TEST_SEED={TEST_SEED} (seeds: crc32(test id) ^ it)"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test, the same on every run (see the module docstring).
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) ^ TEST_SEED) % (2**31))
