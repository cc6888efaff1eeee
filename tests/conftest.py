"""Test-wide setup.

* NaN poisoning: ``torch.use_deterministic_algorithms(True)`` with
  ``fill_uninitialized_memory`` makes every ``torch.empty`` (from Python and from the C++
  extension's ``at::empty``) return NaN-filled floating-point memory, so a kernel that forgets to
  write an element fails its parity test. ``test_poison_is_active`` proves the poison is on.
* Triton runs under its interpreter (``TRITON_INTERPRET=1``) when there is no GPU; it must be set
  before triton is imported.
"""

import os

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


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different, reproducible seed per test: fresh random inputs, and a failure can be re-run.
    torch.manual_seed(hash(request.node.nodeid) % (2**31))
