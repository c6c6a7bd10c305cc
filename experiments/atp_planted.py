"""AtP against exact resample patching on the planted model (the README's numbers).

Run: ``python experiments/atp_planted.py`` (a few seconds)."""

import torch

import lensattr
from lensattr.evidence import Engine, ablate

torch.set_num_threads(1)
model = lensattr.load_model("planted")
prompts = lensattr.tasks.get("planted-copy").prompts(model=model)
r = lensattr.atp(model, prompts, lensattr.LogitDiff())
eng = Engine(model, prompts, lensattr.LogitDiff(), progress=False)
exact = eng.run([ablate(h, method="resample") for h in eng.adapter.heads()]).values
exact = (exact - eng.clean).T.reshape(len(prompts), *r.heads.shape[1:])  # [batch, layer, head]
ag = lensattr.atp_agreement(r.heads, exact)
print(f"{len(prompts)} prompts; AtP path {r.meta['path']!r}")
print("AtP (noising), mean over prompts [layer, head]:\n", r.heads.mean(0))
print("exact resample effect, mean over prompts:\n", exact.mean(0))
print(ag.summary())
print("misses (exactly strong, AtP ranks low):\n", ag.misses.to_string())
print("overrated (AtP ranks high, exactly weak):\n", ag.overrated.to_string())
