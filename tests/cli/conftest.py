import pytest


@pytest.fixture(autouse=True)
def _tiny_models_one_thread(one_thread):
    """One OpenMP thread for these tiny models (tests/conftest.py says why)."""
    yield
