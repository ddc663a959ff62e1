import pytest


@pytest.fixture(autouse=True)
def _tiny_models_one_thread(one_thread, tmp_path, monkeypatch):
    """One OpenMP thread for these tiny models (tests/conftest.py says why), and the BPE
    tokenizers the tests train cached in their tmp_path, not in ~/.cache/thresher."""
    monkeypatch.setenv("THRESHER_CACHE", str(tmp_path / "tokenizer-cache"))
    yield
