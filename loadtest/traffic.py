"""The traffic of the load test, without locust: texts, the request mix, the answer checks.

Everything here is plain Python (numpy for the vector checks), so the runner, the
locustfile and the tests share one definition of what is sent and what a right answer is.

Texts are generated, not downloaded: word lists in ten languages and six scripts, drawn
by a seeded RNG, so a run is reproducible. Lengths are aimed at Qwen2 tokens (the KaLM
tokenizer) with per-language tokens-per-word factors measured once with that tokenizer
(see ``TOKENS_PER_WORD``); they are approximate (roughly ±25%), which is all a load
test needs. Each answer's ``usage.total_tokens`` is what the reports count.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace

import numpy as np

try:  # decoding a 64 x 896 float answer is ~5x faster with orjson; the stdlib works too
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    _loads = json.loads

# --- texts ------------------------------------------------------------------------------------

# Space-separated languages: words. CJK: short words/phrases joined without spaces.
WORDS: dict[str, list[str]] = {
    "en": """the of and to in is that for it as with was on be by this are from at or an have not
        which one can data model service request time system people city river history music
        language learning network energy market water health research school government science
        computer question answer search document embedding vector query server latency memory
        train mountain country village garden library museum festival weather ocean planet
        how what why when where does should could would important small large new old first""".split(),
    "de": """der die das und ist nicht ein eine zu mit auf für von den im sich dem des auch es
        Stadt Fluss Geschichte Sprache Wissenschaft Regierung Schule Bahnhof Wetter Garten
        Bibliothek Forschung Gesundheit Wasser Energie Markt Netzwerk Anfrage Antwort Dokument
        wie warum wann wo welche werden können sollte wichtig groß klein neu alt erste""".split(),
    "fr": """le la les de des et est un une du en que qui dans pour pas sur au avec par plus
        ville rivière histoire langue science gouvernement école gare temps jardin bibliothèque
        recherche santé eau énergie marché réseau question réponse document montagne village
        comment pourquoi quand où quel peut doit important grand petit nouveau ancien premier""".split(),
    "es": """el la los las de del y es un una en que por con para no se su al lo como más
        ciudad río historia idioma ciencia gobierno escuela estación tiempo jardín biblioteca
        investigación salud agua energía mercado red pregunta respuesta documento montaña pueblo
        cómo por qué cuándo dónde cuál puede debe importante grande pequeño nuevo viejo primero""".split(),
    "ru": """и в не на что это как по из за от для до о же так его она они был
        город река история язык наука правительство школа вокзал погода сад библиотека
        исследование здоровье вода энергия рынок сеть вопрос ответ документ гора деревня
        почему когда где какой может должен важный большой маленький новый старый первый""".split(),
    "zh": """的 是 在 了 和 有 我们 这个 一个 不 也 就 都 人 中国 城市 河流 历史 语言 科学 政府 学校
        火车站 天气 花园 图书馆 研究 健康 水 能源 市场 网络 问题 答案 文档 山 村庄 音乐 文化
        如何 为什么 什么时候 哪里 哪个 可以 应该 重要 大 小 新 旧 第一 数据 模型 服务 搜索""".split(),
    "ja": """の は が を に で と も から まで です ます する いる ある 東京 日本 都市 川 歴史
        言語 科学 政府 学校 駅 天気 庭 図書館 研究 健康 水 エネルギー 市場 ネットワーク 質問
        答え 文書 山 村 音楽 文化 どうやって なぜ いつ どこ どの できる べき 重要 大きい
        小さい 新しい 古い 最初 データ モデル サービス 検索""".split(),
    "ar": """في من على إلى عن مع هذا هذه التي الذي كان هو هي ما لا مدينة نهر تاريخ لغة علم
        حكومة مدرسة محطة طقس حديقة مكتبة بحث صحة ماء طاقة سوق شبكة سؤال جواب وثيقة جبل قرية
        كيف لماذا متى أين أي يمكن يجب مهم كبير صغير جديد قديم أول""".split(),
    "hi": """का की के है में और से को पर यह एक भी नहीं था थे शहर नदी इतिहास भाषा विज्ञान सरकार
        स्कूल स्टेशन मौसम बगीचा पुस्तकालय शोध स्वास्थ्य पानी ऊर्जा बाज़ार नेटवर्क प्रश्न उत्तर
        दस्तावेज़ पहाड़ गाँव कैसे क्यों कब कहाँ कौन सकता चाहिए महत्वपूर्ण बड़ा छोटा नया पुराना पहला""".split(),
    "ko": """의 는 이 가 을 를 에 에서 와 도 으로 하다 있다 없다 도시 강 역사 언어 과학 정부 학교
        역 날씨 정원 도서관 연구 건강 물 에너지 시장 네트워크 질문 답변 문서 산 마을 음악 문화
        어떻게 왜 언제 어디 어느 할 수 있는 해야 중요한 큰 작은 새로운 오래된 첫째""".split(),
}
NO_SPACES = {"zh", "ja"}
SENTENCE_END = {"zh": "。", "ja": "。", "ar": ".", "hi": "।"}
QUESTION_END = {"zh": "？", "ja": "？", "ar": "؟"}
#: Share of texts per language (English-heavy, as most traffic is).
LANGUAGE_WEIGHTS = {"en": 40, "zh": 10, "de": 7, "fr": 7, "es": 7, "ru": 7, "ja": 7, "ar": 5, "hi": 5, "ko": 5}
#: Qwen2 tokens per word, measured with the Qwen2 tokenizer on texts from these lists.
TOKENS_PER_WORD = {
    "en": 1.08,
    "de": 1.45,
    "fr": 1.3,
    "es": 1.35,
    "ru": 1.63,
    "zh": 1.05,
    "ja": 1.36,
    "ar": 1.72,
    "hi": 4.95,
    "ko": 1.84,
}

INSTRUCTIONS = [
    "Given a web search query, retrieve relevant passages that answer the query",
    "Given a question, retrieve Wikipedia passages that answer the question",
    "Given a user question, retrieve documentation that helps answer it",
    "Retrieve semantically similar text",
    "Given a claim, find documents that support or refute it",
]


def _sentence(rng: random.Random, lang: str, n_words: int, question: bool = False) -> str:
    words = [rng.choice(WORDS[lang]) for _ in range(max(1, n_words))]
    if lang in NO_SPACES:
        text = "".join(words)
    else:
        words[0] = words[0][:1].upper() + words[0][1:]
        text = " ".join(words)
    end = QUESTION_END.get(lang, "?") if question else SENTENCE_END.get(lang, ".")
    return text + end


def make_text(rng: random.Random, lang: str, n_tokens: int, question: bool = False) -> str:
    """About ``n_tokens`` Qwen2 tokens of ``lang``: sentences of 6-20 words (one for a query)."""
    n_words = max(1, round(n_tokens / TOKENS_PER_WORD[lang]))
    if question:
        return _sentence(rng, lang, n_words, question=True)
    sentences = []
    while n_words > 0:
        k = min(n_words, rng.randint(6, 20))
        sentences.append(_sentence(rng, lang, k))
        n_words -= k
    return ("" if lang in NO_SPACES else " ").join(sentences)


def pick_language(rng: random.Random) -> str:
    langs = list(LANGUAGE_WEIGHTS)
    return rng.choices(langs, weights=[LANGUAGE_WEIGHTS[x] for x in langs])[0]


@dataclass(frozen=True)
class Corpus:
    """Seeded pools of queries and passages; requests draw from them."""

    queries: list[str]
    passages: list[str]

    @classmethod
    def generate(
        cls,
        seed: int,
        query_tokens: tuple[int, int],
        passage_tokens: tuple[int, int],
        n_queries: int = 2000,
        n_passages: int = 1000,
    ) -> Corpus:
        rng = random.Random(seed)
        queries = [
            make_text(rng, pick_language(rng), rng.randint(*query_tokens), question=True) for _ in range(n_queries)
        ]
        passages = [make_text(rng, pick_language(rng), rng.randint(*passage_tokens)) for _ in range(n_passages)]
        return cls(queries, passages)


# --- settings ---------------------------------------------------------------------------------

KINDS = ("query", "docs")


def parse_mix(text: str) -> dict[str, float]:
    """``"query=9,docs=1"`` -> weights; unknown kinds and negative weights are errors."""
    mix: dict[str, float] = {}
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        kind, sep, weight = part.partition("=")
        if kind not in KINDS:
            raise ValueError(f"unknown request kind {kind!r} in mix {text!r}; kinds: {', '.join(KINDS)}")
        mix[kind] = float(weight) if sep else 1.0
        if mix[kind] < 0:
            raise ValueError(f"negative weight in mix {text!r}")
    if not mix or sum(mix.values()) <= 0:
        raise ValueError(f"mix {text!r} has no request kind with a positive weight")
    return mix


def parse_range(text: str) -> tuple[int, int]:
    """``"8-64"`` -> (8, 64); ``"16"`` -> (16, 16)."""
    lo, _, hi = str(text).partition("-")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise ValueError(f"bad range {text!r}: want LO-HI with 1 <= LO <= HI")
    return lo_i, hi_i


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"LOADTEST_{name}", default)


@dataclass
class Settings:
    """What to send and how to check it. Defaults come from LOADTEST_* environment variables."""

    api_key: str | None = None
    model: str | None = None  # None: the first id of GET /v1/models
    expected_dim: int | None = None  # None: probed once (the length of one float answer)
    mix: dict[str, float] = field(default_factory=lambda: {"query": 9.0, "docs": 1.0})
    batch_size: tuple[int, int] = (8, 64)  # texts per document request
    query_tokens: tuple[int, int] = (5, 30)
    passage_tokens: tuple[int, int] = (100, 400)
    base64_share: float = 0.7  # the openai client asks for base64 unless told otherwise
    dimensions_share: float = 0.25
    dimensions_choices: tuple[int, ...] = (512, 256, 128, 64)
    extensions: bool = True  # send `instruction` / `input_type` (off for plain OpenAI)
    seed: int = 1234
    timeout_s: float = 120.0
    norm_tolerance: float = 1e-3

    def describe_mix(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in self.mix.items())


def add_traffic_arguments(parser) -> None:
    """The traffic options, for the runner's argparse and for ``locust -f`` (same names)."""
    d = Settings()
    g = parser.add_argument_group("traffic (kalm load test)") if hasattr(parser, "add_argument_group") else parser
    g.add_argument(
        "--api-key",
        default=None,  # read from the environment later: never shown in --help
        help="Bearer key [LOADTEST_API_KEY, else OPENAI_API_KEY]",
    )
    g.add_argument("--model", default=_env("MODEL"), help="model id [LOADTEST_MODEL; default: from /v1/models]")
    g.add_argument(
        "--expected-dim",
        type=int,
        default=_env("EXPECTED_DIM"),
        help="native embedding size [LOADTEST_EXPECTED_DIM; default: probed once]",
    )
    g.add_argument(
        "--mix",
        default=_env("MIX", d.describe_mix()),
        help="request kinds and weights, e.g. query=9,docs=1 [LOADTEST_MIX]",
    )
    g.add_argument(
        "--batch-size",
        default=_env("BATCH_SIZE", "%d-%d" % d.batch_size),
        help="texts per document request, LO-HI [LOADTEST_BATCH_SIZE]",
    )
    g.add_argument(
        "--query-tokens",
        default=_env("QUERY_TOKENS", "%d-%d" % d.query_tokens),
        help="tokens per query, LO-HI [LOADTEST_QUERY_TOKENS]",
    )
    g.add_argument(
        "--passage-tokens",
        default=_env("PASSAGE_TOKENS", "%d-%d" % d.passage_tokens),
        help="tokens per passage, LO-HI [LOADTEST_PASSAGE_TOKENS]",
    )
    g.add_argument(
        "--base64-share",
        type=float,
        default=_env("BASE64_SHARE", str(d.base64_share)),
        help="share of requests asking for base64 [LOADTEST_BASE64_SHARE]",
    )
    g.add_argument(
        "--dimensions-share",
        type=float,
        default=_env("DIMENSIONS_SHARE", str(d.dimensions_share)),
        help="share of requests sending `dimensions` [LOADTEST_DIMENSIONS_SHARE]",
    )
    g.add_argument(
        "--dimensions-choices",
        default=_env("DIMENSIONS_CHOICES", ",".join(map(str, d.dimensions_choices))),
        help="values for `dimensions` (those above the native size are dropped) [LOADTEST_DIMENSIONS_CHOICES]",
    )
    g.add_argument(
        "--no-extensions",
        action="store_true",
        default=_env("EXTENSIONS", "1") == "0",
        help="send no `instruction`/`input_type` (plain OpenAI endpoints) [LOADTEST_EXTENSIONS=0]",
    )
    g.add_argument("--seed", type=int, default=_env("SEED", str(d.seed)), help="workload seed [LOADTEST_SEED]")
    g.add_argument(
        "--request-timeout",
        type=float,
        default=_env("REQUEST_TIMEOUT", str(d.timeout_s)),
        help="seconds before a request counts as failed [LOADTEST_REQUEST_TIMEOUT]",
    )


def settings_from_args(ns: argparse.Namespace) -> Settings:
    expected = getattr(ns, "expected_dim", None)
    return Settings(
        api_key=ns.api_key or _env("API_KEY") or os.environ.get("OPENAI_API_KEY") or None,
        model=ns.model or None,
        expected_dim=int(expected) if expected not in (None, "") else None,
        mix=parse_mix(ns.mix),
        batch_size=parse_range(ns.batch_size),
        query_tokens=parse_range(ns.query_tokens),
        passage_tokens=parse_range(ns.passage_tokens),
        base64_share=float(ns.base64_share),
        dimensions_share=float(ns.dimensions_share),
        dimensions_choices=tuple(int(x) for x in str(ns.dimensions_choices).split(",") if x.strip()),
        extensions=not ns.no_extensions,
        seed=int(ns.seed),
        timeout_s=float(ns.request_timeout),
    )


# --- the target -------------------------------------------------------------------------------


class TargetError(RuntimeError):
    """The target cannot be used (unreachable, no model, probe failed)."""


def _http_json(url: str, api_key: str | None, body: dict | None, timeout_s: float) -> dict:
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise TargetError(f"{req.get_method()} {url}: HTTP {exc.code}: {exc.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TargetError(f"{req.get_method()} {url}: {exc}") from None


def discover(host: str, settings: Settings) -> Settings:
    """Fill in the model id (first of /v1/models) and the native size (one float probe)."""
    base = host.rstrip("/")
    model = settings.model
    if model is None:
        listing = _http_json(base + "/v1/models", settings.api_key, None, 30)
        ids = [m.get("id") for m in listing.get("data", []) if m.get("id")]
        if not ids:
            raise TargetError(f"GET {base}/v1/models lists no model; pass --model")
        model = ids[0]
    expected = settings.expected_dim
    if expected is None:
        answer = _http_json(
            base + "/v1/embeddings",
            settings.api_key,
            {"model": model, "input": "load test probe", "encoding_format": "float"},
            settings.timeout_s,
        )
        try:
            expected = len(answer["data"][0]["embedding"])
        except (KeyError, IndexError, TypeError):
            raise TargetError(f"probe answer has no embedding: {str(answer)[:300]}") from None
    return replace(settings, model=model, expected_dim=expected)


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRequest:
    kind: str
    body: dict
    n_inputs: int
    dim: int  # the length every returned vector must have
    encoding: str


class RequestFactory:
    """Draws requests by the mix; one per locust user, each with its own seeded RNG."""

    def __init__(self, settings: Settings, corpus: Corpus, stream: int = 0):
        if settings.model is None or settings.expected_dim is None:
            raise ValueError("settings need model and expected_dim (see discover())")
        self.s = settings
        self.corpus = corpus
        self.rng = random.Random(f"{settings.seed}/{stream}")
        self.kinds = [k for k, w in settings.mix.items() if w > 0]
        self.weights = [settings.mix[k] for k in self.kinds]
        native = settings.expected_dim
        self.dims = [d for d in settings.dimensions_choices if d <= native] or [max(1, native // 2)]

    def next(self) -> PlannedRequest:
        rng, s = self.rng, self.s
        kind = rng.choices(self.kinds, weights=self.weights)[0]
        encoding = "base64" if rng.random() < s.base64_share else "float"
        body: dict = {"model": s.model, "encoding_format": encoding}
        if kind == "query":
            body["input"] = rng.choice(self.corpus.queries)
            n = 1
            if s.extensions:
                body["instruction"] = rng.choice(INSTRUCTIONS)
        else:
            n = rng.randint(*s.batch_size)
            body["input"] = [rng.choice(self.corpus.passages) for _ in range(n)]
            if s.extensions:
                body["input_type"] = "document"
        dim = s.expected_dim
        if rng.random() < s.dimensions_share:
            dim = body["dimensions"] = rng.choice(self.dims)
        return PlannedRequest(kind, body, n, dim, encoding)


# --- answers ------------------------------------------------------------------------------------

OK, OVERLOAD = "ok", "overload"
OVERLOAD_STATUSES = (429, 503)


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "ok", "overload", or the failure kind (http_500, wrong_dimension, ...)
    tokens: int = 0  # usage.total_tokens of a right answer
    message: str = ""  # details of one case (varies per request)

    @property
    def ok(self) -> bool:
        return self.outcome == OK

    @property
    def label(self) -> str:
        """Stable text naming the kind, so reports group failures by kind, not by detail."""
        return f"{self.outcome}: {self.message}" if self.outcome == OVERLOAD else self.outcome


def check_answer(
    status: int,
    headers,
    content: bytes | None,
    planned: PlannedRequest,
    norm_tolerance: float = 1e-3,
    error: BaseException | None = None,
) -> Verdict:
    """Is this the right answer to ``planned``? Anything but a right answer or overload is a failure.

    ``status`` 0 means no HTTP answer; ``error`` then says why (a timeout, a refused connection).
    """
    if not status:
        if isinstance(error, TimeoutError) or "timeout" in type(error).__name__.lower():
            return Verdict("timeout", message=f"no answer in time ({type(error).__name__})")
        return Verdict("connection_error", message=f"no HTTP answer: {type(error).__name__}: {error}"[:300])
    if status != 200:
        retry_after = headers.get("retry-after") if headers is not None else None
        if status in OVERLOAD_STATUSES and retry_after:
            return Verdict(OVERLOAD, message=f"HTTP {status}")
        return Verdict(f"http_{status}", message=f"HTTP {status}: {(content or b'')[:200]!r}")
    try:
        answer = _loads(content or b"")
        data = answer["data"]
        usage = answer["usage"]
    except (ValueError, KeyError, TypeError) as exc:
        return Verdict("bad_json", message=f"not an embeddings answer: {type(exc).__name__}: {exc}"[:300])
    if not isinstance(data, list) or len(data) != planned.n_inputs:
        got = len(data) if isinstance(data, list) else type(data).__name__
        return Verdict("wrong_count", message=f"{got} embeddings for {planned.n_inputs} inputs")
    try:
        items = sorted(data, key=lambda d: d["index"])
        if [d["index"] for d in items] != list(range(planned.n_inputs)):
            return Verdict("wrong_index", message="indices are not 0..n-1")
        vectors = [_vector(d["embedding"], planned.encoding) for d in items]
    except (KeyError, TypeError, ValueError) as exc:
        return Verdict("bad_json", message=f"bad embedding item: {type(exc).__name__}: {exc}"[:300])
    for i, v in enumerate(vectors):
        if v.shape != (planned.dim,):
            return Verdict("wrong_dimension", message=f"item {i} has {v.size} dims, expected {planned.dim}")
        if not np.isfinite(v).all():
            return Verdict("non_finite", message=f"item {i} has NaN or inf")
        norm = float(np.sqrt(np.dot(v.astype(np.float64), v.astype(np.float64))))
        if abs(norm - 1.0) > norm_tolerance:
            return Verdict("not_unit", message=f"item {i} has norm {norm:.6f}, expected 1")
    tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < planned.n_inputs:
        return Verdict("bad_usage", message=f"usage.total_tokens is {tokens!r} for {planned.n_inputs} inputs")
    return Verdict(OK, tokens=tokens)


def _vector(embedding, encoding: str) -> np.ndarray:
    if encoding == "base64":
        if not isinstance(embedding, str):
            raise TypeError(f"base64 was asked for, got {type(embedding).__name__}")
        raw = base64.b64decode(embedding, validate=True)
        if len(raw) % 4:
            raise ValueError(f"base64 payload of {len(raw)} bytes is not float32")
        return np.frombuffer(raw, dtype="<f4")
    if not isinstance(embedding, list):
        raise TypeError(f"float was asked for, got {type(embedding).__name__}")
    return np.asarray(embedding, dtype=np.float64)


def percentile(values, q: float) -> float:
    """Exact percentile (linear interpolation) of ``values``; NaN when empty."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else math.nan
