"""The modules in this package share one service: `serve run cluster/config.yaml` as shipped.

Each `serve run` costs the suite about 45 s to start and stop, and no other one may run beside it
(both would take Ray's dashboard port), so the modules that need the service as shipped share one,
started before their first test and stopped after their last.
"""

from __future__ import annotations

import pytest

from tests.service_harness import ServeProcess


@pytest.fixture(scope="package")
def service(tiny_model_dir):
    with ServeProcess(tiny_model_dir) as svc:
        yield svc
