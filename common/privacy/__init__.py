"""Differential privacy at each hospital: DP-SGD with Opacus' accountants, cumulative accounting,
a lifetime ledger, the budget stop and the privacy-budget report.

- ``config``: ``conf/privacy/default.yaml`` as a dataclass;
- ``accounting``: epsilon from a stored (noise, rate, steps) history by RDP or PRV, the round's plan;
- ``wiring``: per-sample gradients of the covered parameters, clipping, noise, Poisson batches;
- ``step``: the unified step with DP-SGD;
- ``ledger``: the hospital's privacy ledger per data set;
- ``budget``: one round's bookkeeping (restore, budget stop, ledger entry, reply metrics);
- ``report``: privacy/report.md, report.json and epsilon.png of a run.
"""

from common.privacy.config import PrivacyConfig, privacy_config

__all__ = ["PrivacyConfig", "privacy_config"]
