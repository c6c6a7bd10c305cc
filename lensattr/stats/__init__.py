"""Statistics, free of models: estimates with intervals, sign-flip and one-sided tests,
Benjamini-Hochberg q-values (``inference``), Fieller ratio intervals (``ratio``), intervals after
selection (``selection``: Benjamini-Yekutieli FCR) and rank agreement (``agreement``).

Only torch: nothing here knows a model, a prompt or a head."""
