"""lensattr: does this attention head really do what its attention map says?

The front door::

    import lensattr
    model = lensattr.load_model("planted")
    result = lensattr.audit(model, "planted-copy")
    result.heads, result.edges, result.save("out/")
"""

from . import tasks
from .auditing.config import AuditConfig
from .auditing.result import Audit, AuditLoadError
from .auditing.run import audit
from .compare.atp_agreement import AtPAgreement, atp_agreement
from .compare.verdicts import Thresholds
from .core.config import RunConfig
from .core.metric import Metric
from .core.metrics import AnswerLogProb, KLToClean, LogitDiff, LogitsMetric
from .core.prompts import PromptSet
from .core.types import AblationMethod, HeadId
from .core.version import __version__
from .evidence.attribution import atp
from .evidence.attribution_result import AtPResult
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
]
