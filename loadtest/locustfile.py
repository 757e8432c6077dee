"""OpenAI-style embeddings traffic for locust, every answer checked.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000            # web UI
    locust -f loadtest/locustfile.py --host URL --headless -u 8 -r 2 -t 60s --mix query=1
    python -m loadtest.run --host URL ...                                    # reports + summary + step mode

Each user is one client sending requests back to back over one reused connection
(``FastHttpUser``): single queries with an instruction, document batches, base64 or
float answers, a share with ``dimensions`` (see ``request_mix.py`` and ``--help``). An answer
counts as a success only if it is right: HTTP 200, one vector per input in input order,
the expected dimension, finite, unit length, and a ``usage.total_tokens``. Overload
answers (429/503 with Retry-After) are reported as failures named ``overload: ...``; the
runner counts them apart from real failures. Requests are named by kind
(``embeddings:query``, ``embeddings:docs``) so the reports give each kind's latency.
"""

from __future__ import annotations

import itertools
import time

import gevent.lock
from locust import FastHttpUser, events, task
from locust.exception import CatchResponseError

# Absolute imports: `locust -f loadtest/locustfile.py` loads this file as a top-level module, with
# the working directory (the repository root) on sys.path.
from loadtest.answers import OK, OVERLOAD, check_answer
from loadtest.request_mix import PlannedRequest, RequestFactory
from loadtest.settings import Settings, add_traffic_arguments, settings_from_args
from loadtest.target import discover
from loadtest.texts import Corpus

#: What the users send. The runner sets it (``configure``); ``locust -f`` fills it from its options.
SETTINGS: Settings | None = None
_CORPUS: Corpus | None = None
_setup_lock = gevent.lock.Semaphore()
_user_ids = itertools.count()
#: Requests on the wire, per user: (start time, kind). Step mode counts those older than the SLO,
#: so a step is not judged only on the requests that were quick enough to finish within it.
IN_FLIGHT: dict[int, tuple[float, str]] = {}


class WrongAnswer(CatchResponseError):
    """A failed request, named by its kind (http_500, wrong_dimension, ...) in every report."""

    def __repr__(self) -> str:  # locust's CSVs show repr(error): keep it the bare kind
        return str(self.args[0])


class Overload(WrongAnswer):
    """429/503 with Retry-After: the service shedding load, counted apart from failures."""


def configure(settings: Settings) -> None:
    """Use ``settings`` (model and expected_dim may still be None: found on first use)."""
    global SETTINGS, _CORPUS
    SETTINGS, _CORPUS = settings, None
    EmbeddingsUser.network_timeout = settings.timeout_s


def _ready(host: str) -> tuple[Settings, Corpus]:
    """Settings with model and dimension known, and the corpus; done once per process."""
    global SETTINGS, _CORPUS
    with _setup_lock:
        if SETTINGS is None:
            raise RuntimeError("locustfile not configured")
        if SETTINGS.model is None or SETTINGS.expected_dim is None:
            SETTINGS = discover(host, SETTINGS)
        if _CORPUS is None:
            s = SETTINGS
            _CORPUS = Corpus.generate(s.seed, s.query_tokens, s.passage_tokens)
        return SETTINGS, _CORPUS


@events.init_command_line_parser.add_listener
def _add_arguments(parser, **_kwargs):
    add_traffic_arguments(parser)


@events.init.add_listener
def _on_init(environment, **_kwargs):
    options = environment.parsed_options
    if options is not None and hasattr(options, "mix"):  # started by `locust -f`, not by the runner
        configure(settings_from_args(options))


class EmbeddingsUser(FastHttpUser):
    """One client: a request, its check, the next request (no think time)."""

    network_timeout = Settings.timeout_s  # configure() sets --request-timeout
    connection_timeout = 30.0

    def on_start(self):
        settings, corpus = _ready(self.host)
        self.settings = settings
        self.factory = RequestFactory(settings, corpus, stream=next(_user_ids))
        self.headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}

    @task
    def embed(self):
        planned = self.factory.next()
        context = {"kind": planned.kind, "outcome": OK, "tokens": 0, "inputs": planned.n_inputs}
        IN_FLIGHT[id(self)] = (time.time(), planned.kind)
        try:
            self._post(planned, context)
        finally:
            IN_FLIGHT.pop(id(self), None)

    def _post(self, planned: PlannedRequest, context: dict) -> None:
        with self.client.post(
            "/v1/embeddings",
            json=planned.body,
            headers=self.headers,
            name=f"embeddings:{planned.kind}",
            context=context,
            catch_response=True,
        ) as response:
            verdict = check_answer(
                response.status_code,
                response.headers,
                response.content,
                planned,
                self.settings.norm_tolerance,
                error=getattr(response, "error", None),
            )
            # the request event carries these to the runner (and to any other listener)
            response.request_meta["context"].update(
                outcome=verdict.outcome, tokens=verdict.tokens, detail=verdict.message
            )
            if verdict.ok:
                response.success()
            elif verdict.outcome == OVERLOAD:
                response.failure(Overload(verdict.label))
            else:
                response.failure(WrongAnswer(verdict.label))
