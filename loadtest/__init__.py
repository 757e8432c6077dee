"""Load tests and benchmarks of the service, run from the repository root with ``python -m loadtest.<module>``.

``run`` (locust, headless, step load) and ``locustfile`` (``locust -f loadtest/locustfile.py``) send the
traffic of ``settings``, ``texts`` and ``request_mix`` and judge it with ``answers``; ``benchmark`` measures
the encoder in-process and served (``benchmark_workload``, ``benchmark_targets``, ``priority_scenario``);
``soak`` and ``big_bodies`` probe a running service. Percentiles come from ``stats``.
"""
