"""The engine's modules after the split of engine.py (issue 18): the old import path still
gives every name, and the new modules name the device of every tensor they make (as
tests/test_devices.py checks for engine.py and hooks.py)."""

import ast
from pathlib import Path

import lensattr

from .test_devices import FACTORIES

ROOT = Path(lensattr.__file__).parent
NEW = ("evidence/chunk_plan.py", "evidence/chunk_forward.py", "evidence/metric_rows.py",
       "evidence/engine_result.py")


def test_old_import_path_keeps_its_names():
    from lensattr.evidence import engine
    from lensattr.evidence.engine import ENGINE_SEMANTICS, Engine, EngineResult

    assert ENGINE_SEMANTICS == 2 and issubclass(Engine, engine.HookBuilders)
    assert EngineResult is lensattr.evidence.EngineResult
    for name in ("MetricError", "check_metric_output", "BARE_SITES", "METHOD_CODE",
                 "pattern_hook", "BareForward", "EvidenceStore", "Intervention", "digest",
                 "position_bytes", "metric_identity", "prompts_digest", "Adapter", "ModelError",
                 "as_metric", "PromptSet", "Site", "AblationMethod", "Metric", "tqdm", "_CPU"):
        assert hasattr(engine, name), name


def test_new_engine_modules_name_a_device():
    bad = []
    for rel in NEW:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and node.func.attr in FACTORIES
                    and not any(k.arg == "device" for k in node.keywords)):
                bad.append(f"{rel}:{node.lineno} torch.{node.func.attr}")
    assert not bad, "tensor factories without device=: " + ", ".join(bad)
