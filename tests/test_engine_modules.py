"""The engine's modules after the split of engine.py (issue 18): the old import path still
gives every name (tests/test_devices.py scans the new modules for tensors made without a
device)."""

import lensattr


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
