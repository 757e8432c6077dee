"""Seeded multilingual texts of about a given number of Qwen2 tokens, and the pools requests draw from.

Texts are generated, not downloaded: word lists in ten languages and six scripts, drawn
by a seeded RNG, so a run is reproducible. Lengths are aimed at Qwen2 tokens (the KaLM
tokenizer) with per-language tokens-per-word factors measured once with that tokenizer
(see ``TOKENS_PER_WORD``); they are approximate (roughly ±25%), which is all a load
test needs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

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


def random_text(rng: random.Random, tokens: tuple[int, int], question: bool = False) -> str:
    """About ``tokens`` (LO, HI) Qwen2 tokens in a language drawn by ``LANGUAGE_WEIGHTS``."""
    return make_text(rng, pick_language(rng), rng.randint(*tokens), question=question)


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
        queries = [random_text(rng, query_tokens, question=True) for _ in range(n_queries)]
        passages = [random_text(rng, passage_tokens) for _ in range(n_passages)]
        return cls(queries, passages)
