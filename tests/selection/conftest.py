"""Fixtures for the selection tests: tiny synthetic token data (no dependency on
thresher.data, which is built concurrently; its Samples has the same attributes)."""
import pytest
import torch


class Samples:
    """The part of thresher.data.Samples the scorers use: input_ids/labels (N, T), len, []."""

    def __init__(self, input_ids, labels=None):
        self.input_ids = input_ids
        self.labels = input_ids.clone() if labels is None else labels

    def __len__(self):
        return self.input_ids.size(0)

    def __getitem__(self, idx):
        return Samples(self.input_ids[idx], self.labels[idx])


def pattern_and_noise(n_pattern=32, n_noise=32, vocab=48, seq_len=12, seed=0, pad_tail=True):
    """Target = 'counting' sequences (x, x+1, ...) mod vocab; pool = counting sequences +
    uniform noise. Returns (pool, target, is_noise). Some pool samples get a padded tail."""
    g = torch.Generator().manual_seed(seed)

    def counting(n):
        return (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(seq_len)) % vocab

    pool_ids = torch.cat([counting(n_pattern), torch.randint(0, vocab, (n_noise, seq_len), generator=g)])
    labels = pool_ids.clone()
    if pad_tail:
        labels[::5, -3:] = -100
        pool_ids = pool_ids.clone()
        pool_ids[::5, -3:] = 0
    is_noise = torch.cat([torch.zeros(n_pattern), torch.ones(n_noise)]).bool().numpy()
    return Samples(pool_ids, labels), Samples(counting(32)), is_noise


TINY = dict(d_model=16, n_layers=1, n_heads=2)


@pytest.fixture
def synthetic():
    """Factory: synthetic(**kw) -> (pool, target, is_noise); also .Samples and .TINY."""
    pattern_and_noise.Samples = Samples
    pattern_and_noise.TINY = TINY
    return pattern_and_noise


@pytest.fixture(autouse=True)
def _tiny_models_one_thread(one_thread):
    """One OpenMP thread for these tiny models (tests/conftest.py says why)."""
    yield
