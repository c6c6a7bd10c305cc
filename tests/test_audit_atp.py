"""The audit's AtP columns: AtP's own numbers, normalised like the effects; its agreement with
the exact resample effects in meta; a clear reason (not a failed audit) where AtP cannot run."""

import math

import torch

import lensattr
from lensattr.core.prompts import PromptSet


def test_atp_columns_are_atp_normalised_like_the_effects():
    task = lensattr.tasks.get("planted-copy")
    model = lensattr.load_model(task.model)
    prompts = task.prompts(10, model=model)
    r = lensattr.audit(model, prompts, task.make_metric(), progress=False)
    ref = lensattr.atp(model, prompts, task.make_metric(), mode="noising")
    clean, corr = ref.base, ref.other
    den = float((corr - clean).mean())
    for _, row in r.heads.iterrows():
        want = float(ref.heads[:, row["layer"], row["head"]].mean()) / den
        assert math.isclose(row["atp_resample"], want, rel_tol=1e-4, abs_tol=1e-7)
    assert sorted(r.heads["atp_rank"]) == list(range(1, len(r.heads) + 1))
    top = r.heads.loc[r.heads["atp_rank"] == 1]
    assert abs(top["atp_resample"].iloc[0]) == r.heads["atp_resample"].abs().max()
    agree = r.meta["atp"]["agreement_with_exact"]
    assert -1 <= agree["spearman"] <= 1 and agree["top"] == 5


def test_no_corrupted_prompts_gives_nan_with_the_reason():
    task = lensattr.tasks.get("planted-copy")
    model = lensattr.load_model(task.model)
    p = task.prompts(10, model=model)
    bare = PromptSet(tokens=p.tokens, answers=p.answers, wrong=p.wrong, roles=p.roles,
                     vocab=p.vocab)
    r = lensattr.audit(model, bare, task.make_metric(), progress=False)
    assert r.heads["atp_resample"].isna().all()
    assert r.meta["atp"] == {"computed": False, "why": "AtP needs corrupted prompts"}


def test_a_metric_without_gradient_is_reported_not_fatal():
    task = lensattr.tasks.get("planted-copy")
    model = lensattr.load_model(task.model)
    base = task.make_metric()

    class Rounded(type(base)):
        def compute(self, values, prompts, clean):
            return torch.round(super().compute(values, prompts, clean))

    metric = Rounded.__new__(Rounded)
    metric.__dict__.update(base.__dict__)
    r = lensattr.audit(model, task.prompts(10, model=model), metric, progress=False)
    assert r.heads["atp_resample"].isna().all() and not r.meta["atp"]["computed"]
    assert "metric" in r.meta["atp"]["why"]
