"""The scorer and online-selector registries (thresher.selection.registry): built-ins found by
name without importing their modules first, a user's class registered the same way, a clash
refused, and an unknown name named in the error with the choices."""
from __future__ import annotations

import numpy as np
import pytest

from thresher.selection import available_methods, build_scorer, register_scorer
from thresher.selection.base import Scorer
from thresher.selection.registry import ONLINE, SCORERS, Registry


def test_builtins_are_listed_and_built():
    assert available_methods() == sorted(["bliss", "color", "excess", "loss", "miniplm",
                                          "qurating", "random"])
    assert type(build_scorer("random", vocab_size=10)).__name__ == "RandomScorer"
    assert ONLINE.names()[:5] == ["blade", "rho", "rho1", "random", "highloss"]
    assert ONLINE.get("blade", "name").__name__ == "BLADE"
    assert ONLINE.get("blade", "name").uses_val_data and not ONLINE.get("random", "name").uses_val_data


def test_a_user_scorer_registers_and_builds(monkeypatch):
    monkeypatch.setattr(SCORERS, "_classes", dict(SCORERS._classes))  # undone after the test

    @register_scorer("constant")
    class Constant(Scorer):
        def _fit(self, pool, target, progress):
            pass

        def _score(self, samples, batch_size, progress):
            return np.ones(len(samples))

    assert Constant.method == "constant" and "constant" in available_methods()
    assert isinstance(build_scorer("constant", vocab_size=10), Constant)
    with pytest.raises(ValueError, match="'constant' is already registered by Constant"):
        register_scorer("constant")(type("Other", (Scorer,), {}))


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match=r"method must be one of bliss, color, .*got 'blis'"):
        build_scorer("blis", vocab_size=10)
    with pytest.raises(ValueError, match="name must be one of blade, rho, rho1, random, highloss"):
        ONLINE.get("bladee", "name")
    with pytest.raises(ValueError, match="non-empty str"):
        Registry("thing", "name", {}).register("")
