"""Is attention explanation? The classic tests in one call: permuted and adversarial attention
(Jain & Wallace 2019), uniform and frozen attention (Wiegreffe & Pinter 2019), and token
attributions (captum) against attention, norm, rollout and flow claims (Abnar & Zuidema 2020).
"""

from .adversarial import adversarial_attention, jsd
from .attributions import (
           METHODS,
           TokenAttributions,
           attribute_embeddings,
           occlusion,
           token_attributions,
)
from .baselines import attention_baselines
from .permute import permuted_attention
from .result import ExplainLoadError, ExplanationTests
from .run import TESTS, explanation_tests
from .setup import TestTable

__all__ = ["explanation_tests", "ExplanationTests", "ExplainLoadError", "TESTS", "METHODS",
           "permuted_attention", "attention_baselines", "adversarial_attention",
           "token_attributions", "occlusion", "attribute_embeddings", "TokenAttributions",
           "TestTable", "jsd"]
