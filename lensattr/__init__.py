"""lensattr: does this attention head really do what its attention map says?

The front door::

    import lensattr
    model = lensattr.load_model("planted")
    result = lensattr.audit(model, "planted-copy")
    result.heads, result.edges, result.save("out/")

The top level holds what a notebook reaches for: the audit and its result, prompts and
metrics, the claim sources (``rollout``, ``flow``, ``norm_attention``), the decompositions
(``direct_logit_attribution``, ``source_dla``), patching and attribution patching, and the
verdict records. ``__all__`` lists exactly these; everything else lives in the subpackages
(``lensattr.claims``, ``lensattr.evidence``, ``lensattr.compare``, ...).
"""

from . import tasks
from .auditing.config import AuditConfig
from .auditing.result import Audit, AuditLoadError
from .auditing.run import audit
from .claims.flow import Flow, flow
from .claims.norms import NormAttention, norm_attention
from .claims.rollout import Rollout, rollout
from .compare.atp_agreement import AtPAgreement, atp_agreement
from .compare.records import Verdict
from .compare.verdicts import Thresholds
from .core.config import RunConfig
from .core.distributed import RankFailure
from .core.metric import Metric
from .core.metrics import AnswerLogProb, KLToClean, LogitDiff, LogitsMetric
from .core.prompts import PromptSet
from .core.types import AblationMethod, HeadId
from .core.version import __version__
from .evidence.attribution import atp
from .evidence.attribution_result import AtPResult
from .evidence.decomposition import SourceDLA, source_dla
from .evidence.dla import DLA, direct_logit_attribution
from .evidence.keys import EvidenceKey
from .evidence.patching import activation_patching, path_patching
from .evidence.patching_result import ActivationPatching, PathPatching
from .explain import ExplanationTests, explanation_tests
from .models.adapter import Adapter
from .models.loading import list_models, load_model

__all__ = [
    "__version__",
    "audit",
    "Audit",
    "AuditLoadError",
    "AuditConfig",
    "RunConfig",
    "tasks",
    "load_model",
    "list_models",
    "Adapter",
    "PromptSet",
    "Metric",
    "LogitDiff",
    "AnswerLogProb",
    "KLToClean",
    "LogitsMetric",
    "Thresholds",
    "Verdict",
    "EvidenceKey",
    "HeadId",
    "AblationMethod",
    "explanation_tests",
    "ExplanationTests",
    "atp",
    "AtPResult",
    "atp_agreement",
    "AtPAgreement",
    "activation_patching",
    "path_patching",
    "ActivationPatching",
    "PathPatching",
    # claim sources: what attention (and value-aware, multi-layer variants) says
    "rollout",
    "Rollout",
    "flow",
    "Flow",
    "norm_attention",
    "NormAttention",
    # decompositions: where the metric comes from, read off the residual stream
    "direct_logit_attribution",
    "DLA",
    "source_dla",
    "SourceDLA",
    # sharded runs (torchrun): a rank that stopped before the ranks swapped their results
    "RankFailure",
]
