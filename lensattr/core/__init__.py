"""The vocabulary every layer shares: head ids and ablation names (``types``), hook sites
(``sites``: the one module that spells TransformerLens hook names), prompt sets (``prompts``),
the metric contract (``metric``) and the bundled metrics (``metrics``), the version.

Nothing in ``core`` imports any other part of lensattr (checked by the import contract in
``pyproject.toml``)."""
