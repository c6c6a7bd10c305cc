"""lensattr: does this attention head really do what its attention map says?

The front door::

    import lensattr
    model = lensattr.load_model("planted")
    result = lensattr.audit(model, "planted-copy")
    result.heads, result.edges, result.save("out/")
"""

__version__ = "0.1.0"

from . import tasks, tasks_text  # noqa: F401  (tasks_text registers ioi, repeat-tokens, ...)
from .audit import audit
from .audit_result import Audit, AuditLoadError
from .compare.atp_agreement import AtPAgreement, atp_agreement
from .compare.verdicts import Thresholds
from .evidence.attribution import atp
from .evidence.attribution_result import AtPResult
from .evidence.patching import activation_patching, path_patching
from .evidence.patching_result import ActivationPatching, PathPatching
from .explain import ExplanationTests, explanation_tests
from .loading import list_models, load_model
from .metrics import AnswerLogProb, KLToClean, LogitDiff, LogitsMetric, Metric
from .model import Adapter
from .prompts import PromptSet
from .types import AblationMethod, HeadId

__all__ = [
    "__version__",
    "audit",
    "Audit",
    "AuditLoadError",
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
