"""lensattr stores nothing on the caller's model: its name, its probe results and the stacked
weight copies are kept beside it (lensattr.models.state), per set of weights, and die with it."""

import gc
import weakref

import pytest
import torch

import lensattr
from lensattr.models import state
from lensattr.models.adapter import Adapter


@pytest.fixture(scope="module")
def audited():
    """The planted model, its ``__dict__`` keys as loaded, and those after an audit."""
    model = lensattr.load_model("planted")
    loaded = set(vars(model))
    Adapter(model)
    lensattr.audit(model, "planted-copy", progress=False, n_prompts=10)
    return model, loaded, set(vars(model))


def test_no_attribute_added_to_the_model(audited):
    model, loaded, after = audited
    assert after == loaded  # Adapter and audit added nothing
    assert not [k for k in after if "lensattr" in k]  # nor did load_model


def test_name_still_reported(audited):
    model, _, _ = audited
    assert Adapter(model).name == "planted"
    assert state.loaded_name(model) == "planted"


def test_probes_reused_by_another_adapter(audited):
    model, _, _ = audited
    first = Adapter(model)._probe_store()
    assert "pattern_editable" in first and "fast_readout" in first  # probed by the audit
    second = Adapter(model)._probe_store()
    assert second.shared is first.shared
    assert second["_stacked"] is first["_stacked"]  # the stacked weights are not rebuilt
    first["pattern_editable"] = False  # a probe result for these weights
    assert Adapter(model).pattern_editable is False
    del first["pattern_editable"]
    assert Adapter(model).pattern_editable is True  # probed again


def test_probes_dropped_when_weights_change(audited):
    model, _, _ = audited
    a = Adapter(model)
    stacked = a._stacked_all()
    a._probe_store()["pattern_editable"] = False
    w = next(p for p in model.parameters() if p.dim() == 2)
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[0, 0] += 1.0
        store = Adapter(model)._probe_store()
        assert "pattern_editable" not in store and "_stacked" not in store
        assert Adapter(model).pattern_editable is True
        assert Adapter(model)._stacked_all() is not stacked
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_object_probes_stay_with_their_adapter():
    """A probe result that is an object (it may hold the adapter, so the model) is not shared:
    a shared one would keep the model alive."""
    model = lensattr.load_model("planted")
    a = Adapter(model)
    a._probe_store()["held"] = (a, None)
    assert "held" in a._probes.local and "held" not in a._probes.shared
    assert "held" not in Adapter(model)._probe_store()


def test_cache_does_not_keep_a_deleted_model_alive():
    model = lensattr.load_model("planted")
    a = Adapter(model)
    lensattr.audit(a, "planted-copy", progress=False, n_prompts=10)
    a._probe_store()["held"] = (a, None)  # an object probe that reaches the model
    assert state.loaded_name(model) == "planted"
    gc.collect()  # models left by earlier tests go first, so the counts below are ours
    n_probes, n_info = len(state._PROBES), len(state._INFO)
    ref = weakref.ref(model)
    del model, a
    gc.collect()
    assert ref() is None
    assert len(state._PROBES) == n_probes - 1 and len(state._INFO) == n_info - 1


def test_stand_ins_without_weak_references_are_bounded():
    from types import SimpleNamespace

    cache: state.ModelCache[int] = state.ModelCache()
    fakes = [SimpleNamespace() for _ in range(state._STRONG_MAX + 3)]
    for i, f in enumerate(fakes):
        cache.put(f, i)
    assert len(cache) == state._STRONG_MAX
    assert cache.get(fakes[0]) is None and cache.get(fakes[-1]) == len(fakes) - 1
