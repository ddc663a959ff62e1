"""Device plumbing shared by the whole suite (tests/devices uses it most).

Devices under test: ``cpu`` always, ``cuda`` when ``torch.cuda.is_available()``. Set
``THRESHER_TEST_DEVICES`` (comma-separated, e.g. ``cpu,cuda``) to choose them yourself; a
device or backend named that way that cannot run is then a *failure*, not a skip, so a GPU
run (benchmarks/gpu_check.sh sets ``THRESHER_TEST_DEVICES=cpu,cuda``) cannot pass by
skipping its CUDA cases. Without the variable, CUDA cases are collected on every machine and
skip with the reason, so the test count says how many did not run.

Two fixtures, both filled by ``pytest_generate_tests`` below:

* ``device_under_test``: a ``torch.device``, one per device under test;
* ``backend_case``: a :class:`Case` ``(device, backend, dtype)`` for every backend an op's
  dispatcher declares for that device and every dtype that backend claims. The test module
  names the dispatcher in a module attribute ``DISPATCH`` (``thresher.ops.<family>.DISPATCH``)
  and may narrow the dtypes with ``CASE_DTYPES``. Whether the backend can run (extension
  built, triton importable, device present) is asked of that dispatcher at setup.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch

KNOWN_DEVICES = ("cpu", "cuda")
ENV = "THRESHER_TEST_DEVICES"


def _requested() -> tuple[tuple[str, ...], bool]:
    """(devices, strict). strict: the devices were named in THRESHER_TEST_DEVICES."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return KNOWN_DEVICES, False
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    bad = [n for n in names if n not in KNOWN_DEVICES]
    if bad or not names:
        raise pytest.UsageError(f"{ENV} must be a comma-separated list of {KNOWN_DEVICES}, "
                                f"got {raw!r}")
    return names, True


DEVICES, STRICT = _requested()


def device_missing(name: str) -> str | None:
    """Why ``name`` cannot run tests in this process, or None."""
    if name == "cuda" and not torch.cuda.is_available():
        built = torch.version.cuda
        return ("no CUDA device: torch.cuda.is_available() is False (torch "
                f"{torch.__version__}, {'CUDA ' + built if built else 'a CPU-only build'})")
    return None


def unavailable(reason: str) -> None:
    """Skip, or fail when the devices were chosen explicitly (a GPU run must not pass by
    skipping)."""
    if STRICT:
        pytest.fail(f"{reason} ({ENV}={os.environ.get(ENV)} asks for it)", pytrace=False)
    pytest.skip(reason)


class Case(NamedTuple):
    device: torch.device
    backend: str
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"{self.device.type}-{self.backend}-{str(self.dtype).replace('torch.', '')}"


def dispatcher_cases(dispatch, dtypes=None) -> list[Case]:
    """Every (device, backend, dtype) the dispatcher declares for the devices under test.
    The Triton interpreter's CPU runs are not listed (tests/kernels covers them)."""
    out = []
    for dev in DEVICES:
        for name, spec in dispatch.specs.items():
            if dev not in spec.devices:
                continue
            for dt in spec.dtypes:
                if dtypes is None or dt in dtypes:
                    out.append(Case(torch.device(dev), name, dt))
    return out


def pytest_generate_tests(metafunc):
    if "device_under_test" in metafunc.fixturenames:
        metafunc.parametrize("device_under_test", list(DEVICES), ids=list(DEVICES), indirect=True)
    if "backend_case" in metafunc.fixturenames:
        dispatch = getattr(metafunc.module, "DISPATCH", None)
        if dispatch is None:
            raise pytest.UsageError(f"{metafunc.module.__name__} uses the 'backend_case' fixture "
                                    "but has no module attribute DISPATCH (the op's dispatcher)")
        cases = dispatcher_cases(dispatch, getattr(metafunc.module, "CASE_DTYPES", None))
        metafunc.parametrize("backend_case", cases, ids=[c.id for c in cases], indirect=True)


@pytest.fixture
def device_under_test(request) -> torch.device:
    why = device_missing(request.param)
    if why:
        unavailable(why)
    return torch.device(request.param)


@pytest.fixture
def backend_case(request) -> Case:
    c: Case = request.param
    why = device_missing(c.device.type)
    if why:
        unavailable(why)
    dispatch = request.module.DISPATCH
    # the backend itself (extension built, triton importable); problem-size limits are the
    # test's business, so only the device/dtype/availability reasons are asked here
    reasons = dispatch.reasons(c.backend, c.device, c.dtype)
    if reasons:
        unavailable(f"{dispatch.op}: backend '{c.backend}' cannot run here: "
                    + "; ".join(reasons))
    return c


@pytest.fixture
def one_thread():
    """These tests run tiny models: on a shared, loaded CI machine two OpenMP threads spend
    most of their time in barriers (measured 20x slower per step than one thread here).
    Restored afterwards, so other test folders keep torch's default."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
