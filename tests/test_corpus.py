"""The offline corpus job: formats, bad rows, resume after a kill, bounded memory, parity with the service.

Reading and planning are tested without Ray. The Ray tests share one small cluster
(2 CPUs, the smallest object store Ray allows) started and stopped here; jobs run
in this process (``cli.main``, ``embed_corpus``) or, where one must be killed or must
not see the test's Ray, as ``python -m serve_app.corpus`` subprocesses.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_app.core.checkpoint import KALM_QUERY_INSTRUCTION
from serve_app.core.quantization import CalibrationRanges
from serve_app.corpus import CorpusOptions, cli, embed_corpus
from serve_app.corpus.benchmark import benchmark
from serve_app.corpus.files import list_inputs
from serve_app.corpus.job import default_rows_per_part
from serve_app.corpus.output import done_parts
from serve_app.corpus.parts import read_part
from serve_app.corpus.pipeline import tokenize
from serve_app.corpus.plan import make_plan
from serve_app.corpus.records import Columns
from serve_app.corpus.scanning import INDEX_STRIDE, scan_file
from serve_app.errors import CorpusError
from tests.service_harness import ROOT, local_cluster

OBJECT_STORE_BYTES = 80 * 1024 * 1024  # Ray's minimum is 75 MiB
WORDS = (
    "ray serve data embedding model query document vector search index corpus token batch actor "
    "cluster the of and to in is for on with 东京 是 日本 的 首都 Käse schläft über naïve café 🚀"
).split()


def make_texts(n: int, seed: int = 0, words: tuple[int, int] = (3, 25)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) for _ in range(n)]


def write_rows(path: Path, fmt: str, rows: list[dict]) -> Path:
    """Write ``rows`` ({"id", "text"}; text may be None) in one of the input formats."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=700)
    elif fmt in ("jsonl", "jsonl.gz"):
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    elif fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t" if fmt == "tsv" else ",")
            writer.writerow(["id", "text"])
            writer.writerows([r["id"], r["text"] or ""] for r in rows)
    elif fmt == "text":
        path.write_text("".join(r["text"] + "\n" for r in rows), encoding="utf-8")
    return path


def plan_for(spec: str, rows_per_part: int, **settings):
    files = list_inputs(spec)
    settings = {"text_column": "text", "id_column": "id", **settings}
    scans = [scan_file(f, Columns(settings["text_column"], settings["id_column"])) for f in files]
    return make_plan(files, scans, settings, rows_per_part, id_column_explicit=False)


def read_all(plan):
    parts = [read_part(plan, p) for p in range(plan.parts)]
    return ([i for p in parts for i in p.ids], [t for p in parts for t in p.texts], [b for p in parts for b in p.bad])


def read_output(out: Path) -> tuple[list, np.ndarray, list[int]]:
    table = pq.read_table(out)
    vectors = np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(len(table), -1)
    return table.column("id").to_pylist(), vectors, table.column("n_tokens").to_pylist()


def by_id(ids, vectors) -> dict:
    return dict(zip(ids, vectors))


def bad_rows(out: Path) -> list[dict]:
    return [
        json.loads(line) for f in sorted((out / "_bad_rows").glob("*.jsonl")) for line in f.read_text().splitlines()
    ]


# --- reading, without Ray -----------------------------------------------------------------

FORMATS = ["parquet", "jsonl", "jsonl.gz", "csv", "tsv", "text"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_every_row_once(tmp_path, fmt):
    texts = make_texts(2600, seed=1)
    texts[3] = 'quoted "field", with a comma\nand a newline' if fmt in ("csv", "tsv", "jsonl", "parquet") else texts[3]
    rows = [{"id": 1000 + i, "text": t} for i, t in enumerate(texts)]
    path = write_rows(tmp_path / f"in.{fmt}", fmt, rows)
    plan = plan_for(str(path), rows_per_part=1000)  # parts start off the 1024-row index: exercises the skip
    ids, got, bad = read_all(plan)
    assert got == texts and not bad
    if fmt == "text":
        assert (plan.id_source, ids) == ("row_number", list(range(len(texts))))
    else:
        assert (plan.id_source, plan.id_type, ids) == ("column", "int64", [r["id"] for r in rows])
    if fmt not in ("parquet",):
        assert len(plan.files[0].index) == -(-len(texts) // INDEX_STRIDE)


def test_folder_and_glob_inputs(tmp_path):
    write_rows(tmp_path / "in/a.parquet", "parquet", [{"id": i, "text": f"a {i}"} for i in range(3)])
    write_rows(tmp_path / "in/sub/b.jsonl", "jsonl", [{"id": 10 + i, "text": f"b {i}"} for i in range(4)])
    write_rows(tmp_path / "in/sub/deeper/c.csv", "csv", [{"id": 20 + i, "text": f"c {i}"} for i in range(2)])
    (tmp_path / "in/_SUCCESS").write_text("")
    (tmp_path / "in/.hidden.jsonl").write_text('{"id": 99, "text": "no"}\n')
    (tmp_path / "in/sub/.hidden.jsonl").write_text('{"id": 98, "text": "no"}\n')
    (tmp_path / "in/README.md").write_text("not data")
    assert [Path(f.uri).name for f in list_inputs(str(tmp_path / "in"))] == ["a.parquet", "b.jsonl", "c.csv"]
    assert [Path(f.uri).name for f in list_inputs(str(tmp_path / "in/sub/*.jsonl"))] == ["b.jsonl"]
    assert [Path(f.uri).name for f in list_inputs(str(tmp_path / "in/**/*.csv"))] == ["c.csv"]
    assert [Path(f.uri).name for f in list_inputs(f"file://{tmp_path}/in/*.parquet")] == ["a.parquet"]
    ids, texts, _ = read_all(plan_for(str(tmp_path / "in"), rows_per_part=2))  # parts span files
    assert ids == [0, 1, 2, 10, 11, 12, 13, 20, 21]
    with pytest.raises(CorpusError, match="format"):
        list_inputs(str(tmp_path / "in/README.md"))
    with pytest.raises(CorpusError, match="does not exist"):
        list_inputs(str(tmp_path / "nope"))


def test_uri_inputs_and_outputs(monkeypatch):
    """Inputs and outputs behind a URI (s3://, gs://, ...): here pyarrow's in-memory mock filesystem."""
    import pyarrow.fs as pafs

    from serve_app.corpus import files, output
    from serve_app.corpus.plan import Plan

    fs = pafs._MockFileSystem()
    monkeypatch.setattr(files, "_from_uri", lambda uri: (fs, uri.split("://", 1)[1].strip("/")))
    fs.create_dir("bucket/in/sub")
    for name, first in (("bucket/in/a.jsonl", 0), ("bucket/in/sub/b.jsonl", 3)):
        with fs.open_output_stream(name) as f:
            f.write("".join(json.dumps({"id": first + i, "text": f"t{first + i}"}) + "\n" for i in range(3)).encode())
    files = list_inputs("mock:///bucket/in")
    assert [f.uri for f in files] == ["mock:///bucket/in/a.jsonl", "mock:///bucket/in/sub/b.jsonl"]
    plan = plan_for("mock:///bucket/in", rows_per_part=4)
    assert read_all(plan)[:2] == ([0, 1, 2, 3, 4, 5], [f"t{i}" for i in range(6)])
    output.write_atomically("mock:///bucket/out/part-00000001.parquet", pa.BufferOutputStream().getvalue())
    output.write_json("mock:///bucket/out/_corpus.json", plan.to_json())
    assert output.done_parts("mock:///bucket/out") == {1}
    assert Plan.from_json(output.read_json("mock:///bucket/out/_corpus.json")).rows == 6


def test_ids_come_from_one_place(tmp_path):
    write_rows(tmp_path / "in/a.jsonl", "jsonl", [{"id": "x", "text": "a"}])
    write_rows(tmp_path / "in/b.txt", "text", [{"text": "b"}])
    with pytest.raises(CorpusError, match="some input files have an id column"):
        plan_for(str(tmp_path / "in"), 10)
    # integer and string ids mixed: all become strings
    write_rows(tmp_path / "mixed.jsonl", "jsonl", [{"id": 1, "text": "a"}, {"id": "two", "text": "b"}])
    plan = plan_for(str(tmp_path / "mixed.jsonl"), 10)
    assert (plan.id_type, read_all(plan)[0]) == ("string", ["1", "two"])


def test_bad_rows_are_found_and_good_rows_kept(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.jsonl").write_bytes(
        b'{"id": 0, "text": "good zero"}\n'
        b'{"id": 1, "text": ""}\n'
        b'{"id": 2, "text": null}\n'
        b'{"id": 3}\n'
        b'{"id": 4, "text": 42}\n'
        b'{"id": 5, "text": "bad \xff utf8"}\n'
        b"{not json\n"
        b"\n"
        b"[1, 2]\n"
        b'{"text": "no id"}\n'
        b'{"id": 10, "text": "good ten"}\n'
    )
    ids, texts, bad = read_all(plan_for(str(tmp_path / "in/a.jsonl"), 4))
    assert (ids, texts) == ([0, 10], ["good zero", "good ten"])
    reasons = {b["row"]: b["reason"] for b in bad}
    assert reasons[1] == "empty text" and reasons[2] == "null text" and reasons[3] == "no text field 'text'"
    assert reasons[4].startswith("text is not a string") and reasons[5].startswith("undecodable")
    assert reasons[6].startswith("invalid JSON") and reasons[7] == "blank line"
    assert reasons[8].startswith("not a JSON object") and reasons[9] == "no id field 'id'"
    assert [b["id"] for b in bad[:5]] == [1, 2, 3, 4, None]

    (tmp_path / "b.csv").write_bytes(b'id,text\n1,fine\n2,"two\nlines"\n3\n4,\xfe\xff\n5,\n6,last\n')
    ids, texts, bad = read_all(plan_for(str(tmp_path / "b.csv"), 100))
    assert (ids, texts) == ([1, 2, 6], ["fine", "two\nlines", "last"])
    assert [(b["row"], b["reason"].split(":")[0]) for b in bad] == [
        (2, "malformed CSV row"),
        (3, "undecodable"),
        (4, "empty text"),
    ]

    (tmp_path / "c.txt").write_bytes(b"one\n\nthree \xc3\x28\nfour")
    ids, texts, bad = read_all(plan_for(str(tmp_path / "c.txt"), 100))
    assert (ids, texts, [b["id"] for b in bad]) == ([0, 3], ["one", "four"], [1, 2])


EMPTY_ID_INPUTS = {
    "csv": b'id,text\n1,one\n,two\n3,three\n" ",four\n',
    "tsv": b"id\ttext\n1\tone\n\ttwo\n3\tthree\n \tfour\n",
    "jsonl": b'{"id": 1, "text": "one"}\n{"id": "", "text": "two"}\n{"id": 3, "text": "three"}\n'
    b'{"id": " ", "text": "four"}\n{"text": "five"}\n{"id": null, "text": "six"}\n',
}


@pytest.mark.parametrize("fmt", sorted(EMPTY_ID_INPUTS))
def test_empty_or_missing_ids_are_bad_rows_and_int_ids_stay_int(tmp_path, fmt):
    (tmp_path / f"in.{fmt}").write_bytes(EMPTY_ID_INPUTS[fmt])
    plan = plan_for(str(tmp_path / f"in.{fmt}"), 100)
    ids, texts, bad = read_all(plan)
    assert (plan.id_type, ids, texts) == ("int64", [1, 3], ["one", "three"])
    expected = [(1, "", "empty id"), (3, " ", "empty id")]
    if fmt == "jsonl":
        expected += [(4, None, "no id field 'id'"), (5, None, "null id")]
    assert [(b["row"], b["id"], b["reason"]) for b in bad] == expected


def test_empty_or_missing_ids_are_bad_rows_in_parquet(tmp_path):
    pq.write_table(pa.table({"id": ["a", "", None, "d"], "text": ["one", "two", "three", "four"]}), tmp_path / "in.pq")
    ids, texts, bad = read_all(plan_for(str(tmp_path / "in.pq"), 100))
    assert (ids, texts) == (["a", "d"], ["one", "four"])
    assert [(b["row"], b["reason"]) for b in bad] == [(1, "empty id"), (2, "null id")]


def test_default_part_size_keeps_every_actor_busy():
    assert default_rows_per_part(10_000_000, 8) == 10_000  # big corpora: big parts
    assert default_rows_per_part(1_000, 2) == 125  # 4 parts per actor
    assert default_rows_per_part(50, 2) == 100  # never tiny parts


def test_over_long_texts_are_bad_rows_unless_truncated(tiny_encoder):
    from serve_app.core.tokenization import TextTokenizer

    tok = TextTokenizer(tiny_encoder.files, max_input_tokens=8)
    texts = ["short", "this text is certainly longer than eight tokens, by quite a lot", "also short"]
    got = tokenize(tok, texts, "", truncate=False)
    assert got[0][1] is None and got[2][1] is None
    assert got[1][0] is None and got[1][1].startswith("over-long: ") and "limit of 8 tokens" in got[1][1]
    assert len(tokenize(tok, texts, "", truncate=True)[1][0]) == 8


STATUS_LINE = re.compile(r"^\[corpus\] \d:\d\d:\d\d ")


def test_status_lines_start_before_ray_does(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The first line comes at once, and Ray is started with its own output kept out of view."""
    import ray

    class RayWouldStartHere(Exception):
        pass

    started_with = {}

    def init(**kwargs):
        started_with.update(kwargs, stderr=capsys.readouterr().err)
        raise RayWouldStartHere

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    inp = write_rows(tmp_path / "in.jsonl", "jsonl", [{"id": 1, "text": "one"}])
    with pytest.raises(RayWouldStartHere):
        embed_corpus(CorpusOptions(str(inp), str(tmp_path / "out"), model=str(tiny_model_dir)))
    lines = started_with["stderr"].splitlines()
    assert all(STATUS_LINE.match(line) for line in lines), lines
    assert "reading the model's files" in lines[0] and lines[-1].endswith(" starting a local Ray")
    assert f"note: {tiny_model_dir} is a stand-in checkpoint with RANDOM weights" in lines[1]
    assert started_with["log_to_driver"] is False and started_with["logging_level"] == logging.ERROR


@pytest.mark.parametrize(
    "wrong, says",
    [
        ({"rows_per_part": 0}, "rows_per_part must be at least 1, got 0"),
        ({"input_type": "queries"}, "input_type must be one of None, query, document, got 'queries'"),
        ({"instruction": " "}, "instruction must not be empty"),
        ({"instruction": "Find", "input_type": "query"}, "an instruction or an input_type, not both"),
    ],
    ids=["rows_per_part", "input_type", "blank instruction", "two prompts"],
)
def test_options_are_checked_before_anything_runs(tmp_path, wrong, says, capsys):
    with pytest.raises(CorpusError, match=re.escape(says)):
        embed_corpus(CorpusOptions(str(tmp_path / "none.jsonl"), str(tmp_path / "out"), **wrong))
    assert capsys.readouterr().err == "" and not (tmp_path / "out").exists()


def test_ray_core_lines_on_stderr_are_held_back():
    """Ray's C++ core writes to the process's stderr directly; the command keeps those lines aside."""
    code = (
        "import os, sys\n"
        "from collections import deque\n"
        "from serve_app.corpus.cli import _ray_core_lines_held_back\n"
        "held = deque()\n"
        "with _ray_core_lines_held_back(held):\n"
        "    os.write(2, b'[2026-11-30 10:14:00,613 E 14316 14316] core_worker.cc:2465: Actor with class name: "
        "MapWorker has constructor arguments in the object store and max_restarts > 0.\\n')\n"
        "    print('[corpus] 0:00:01 a status line', file=sys.stderr)\n"
        "print('held', len(held))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (0, "held 1\n", "[corpus] 0:00:01 a status line\n")


# --- the job on Ray -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray (2 CPUs, minimum object store) for this module; stopped afterwards."""
    import ray

    with local_cluster(head_cpus=2, object_store_memory=OBJECT_STORE_BYTES) as c:
        ray.init(address=c.address, log_to_driver=False)  # as the job's own connection, without --verbose
        try:
            yield c
        finally:
            ray.shutdown()


def job_args(cluster, model_dir, inp, out, *args) -> list[str]:
    """The corpus job's command line against the test cluster."""
    return [
        "--input",
        str(inp),
        "--output",
        str(out),
        "--model",
        str(model_dir),
        "--address",
        cluster.address,
        "--progress-interval",
        "1",
        *args,
    ]


def run_job(cluster, model_dir, inp, out, *args) -> dict:
    code = cli.main(job_args(cluster, model_dir, inp, out, *args))
    summary = json.loads((Path(out) / "_summary.json").read_text())
    assert code == 0 and summary["complete"], summary
    return summary


def command(cluster, model_dir, inp, out, *args) -> list[str]:
    return [sys.executable, "-m", "serve_app.corpus", *job_args(cluster, model_dir, inp, out, *args)]


PARITY_TEXTS = [
    "What is Ray Serve?",
    "Ray Serve is a scalable model serving library.",
    "东京是日本的首都。",
    "Die Katze schläft auf dem Sofa.",
    " leading and trailing spaces ",
    "emoji 🚀 and\ttabs",
    "a much longer document " * 40,
]


@pytest.mark.slow
def test_same_vectors_offline_online_and_encoder(cluster, tiny_model_dir, tiny_encoder, tmp_path):
    """Queries (input_type, the model's query prompt) at 32 Matryoshka dims: job == Encoder.encode == HTTP.

    Documents (no prompt) and --instruction are checked against Encoder.encode in the
    format and bad-row tests; test_service checks Encoder.encode == HTTP for those.
    """
    import httpx

    from tests.service_harness import ServeProcess

    inp = write_rows(tmp_path / "q.jsonl", "jsonl", [{"id": f"q{i}", "text": t} for i, t in enumerate(PARITY_TEXTS)])
    run_job(cluster, tiny_model_dir, inp, tmp_path / "out", "--input-type", "query", "--dimensions", "32")
    ids, vectors, n_tokens = read_output(tmp_path / "out")
    got = by_id(ids, vectors)
    offline = np.stack([got[f"q{i}"] for i in range(len(PARITY_TEXTS))])
    assert offline.shape == (len(PARITY_TEXTS), 32)
    np.testing.assert_allclose(offline, tiny_encoder.encode(PARITY_TEXTS, KALM_QUERY_INSTRUCTION, 32), atol=1e-6)
    with ServeProcess(tiny_model_dir) as service:
        body = {"model": tiny_model_dir.name, "input": PARITY_TEXTS, "input_type": "query", "dimensions": 32}
        answer = httpx.post(service.base_url + "/v1/embeddings", json=body, timeout=120).json()
    online = np.array([d["embedding"] for d in sorted(answer["data"], key=lambda d: d["index"])], dtype=np.float32)
    np.testing.assert_allclose(offline, online, atol=1e-6)
    assert sum(n_tokens) == answer["usage"]["prompt_tokens"]  # same prompt, same tokens


def test_every_format_end_to_end(cluster, tiny_model_dir, tiny_encoder, tmp_path, capsys):
    """A folder of every id-bearing format (plain text: the resume test), tokenised in CPU tasks
    in front of the encoder actors, as on GPU clusters; stderr holds status lines only."""
    texts = make_texts(500, seed=2)
    fmts = ["parquet", "jsonl", "jsonl.gz", "csv", "tsv"]
    for k, fmt in enumerate(fmts):
        write_rows(
            tmp_path / f"in/part{k}.{fmt}",
            fmt,
            [{"id": 1000 * k + i, "text": t} for i, t in enumerate(texts[100 * k : 100 * (k + 1)])],
        )
    summary = run_job(
        cluster, tiny_model_dir, tmp_path / "in", tmp_path / "out", "--rows-per-part", "64", "--tokenize-in", "tasks"
    )
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if not STATUS_LINE.match(line)] == []
    assert "planning: counting the rows of 5 input files" in "\n".join(lines)
    assert "loading the model on 1 encoder actor (1 CPU each; tokenising in CPU tasks)" in "\n".join(lines)
    assert [line for line in lines if "rows (" in line][-1] == lines[-1]
    assert [line for line in lines if "(100.0%)" in line] == [lines[-1]]  # one final line
    assert "500/500 rows (100.0%) | 0 bad" in lines[-1]
    assert (summary["corpus_rows"], summary["embedded"], summary["bad"], summary["parts"]) == (500, 500, 0, 8)
    assert summary["dtypes"] == ["float32"]  # what the encoders ran in ($KALM_DTYPE, set for the tests)
    ids, vectors, n_tokens = read_output(tmp_path / "out")
    expected_ids = [1000 * k + i for k in range(len(fmts)) for i in range(100)]
    assert sorted(ids) == expected_ids
    got = by_id(ids, vectors)
    np.testing.assert_allclose(np.stack([got[i] for i in expected_ids]), tiny_encoder.encode(texts), atol=1e-6)
    assert sum(n_tokens) == summary["tokens"] == sum(len(t.ids) for t in tiny_encoder.tokenizer.encode_texts(texts))
    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64)  # fixed-size list of float32
    assert table.schema.field("n_tokens").type == pa.int32()


INSTRUCTION = "Retrieve semantically similar text"
BAD_JOB_ARGS = ["--max-tokens", "64", "--rows-per-part", "50", "--instruction", INSTRUCTION]


@pytest.fixture(scope="module")
def bad_rows_job(cluster, tiny_model_dir, tmp_path_factory):
    """A job over Parquet + JSON Lines with bad rows of every kind; (folder, texts, summary)."""
    tmp = tmp_path_factory.mktemp("bad")
    texts = make_texts(300, seed=3)
    rows = [{"id": i, "text": t} for i, t in enumerate(texts)]
    rows[10]["text"], rows[20]["text"], rows[30]["text"] = "", None, "this row is far too long for the limit " * 20
    write_rows(tmp / "in/a.parquet", "parquet", rows[:150])
    raw = "".join(json.dumps(r) + "\n" for r in rows[150:]).encode()
    (tmp / "in/b.jsonl").write_bytes(raw.replace(b'{"id": 200,', b'{"id": 200 BROKEN', 1) + b"\xff\xfe\n")
    return tmp, texts, run_job(cluster, tiny_model_dir, tmp / "in", tmp / "out", *BAD_JOB_ARGS)


def test_bad_rows_go_to_a_side_file_and_the_job_carries_on(bad_rows_job, tiny_encoder):
    tmp, texts, summary = bad_rows_job
    bad = bad_rows(tmp / "out")
    assert {(b["id"], b["reason"].split(":")[0]) for b in bad} == {
        (10, "empty text"),
        (20, "null text"),
        (30, "over-long"),
        (None, "invalid JSON"),
        (None, "undecodable"),
    }
    assert {b["row"] for b in bad if b["id"] is None} == {50, 150}  # rows of b.jsonl
    assert all(b["file"].endswith(("a.parquet", "b.jsonl")) for b in bad)
    assert "64 tokens" in next(b["reason"] for b in bad if b["id"] == 30)
    ids, vectors, _ = read_output(tmp / "out")
    good = [i for i in range(300) if i not in (10, 20, 30, 200)]
    assert sorted(ids) == good
    assert (summary["embedded"], summary["bad"], summary["corpus_rows"]) == (296, 5, 301)
    got = by_id(ids, vectors)
    np.testing.assert_allclose(
        np.stack([got[i] for i in good]),
        tiny_encoder.encode([texts[i] for i in good], instruction=INSTRUCTION),
        atol=1e-6,
    )


def test_resume_refuses_other_settings_or_changed_input(bad_rows_job, cluster, tiny_model_dir, capsys):
    tmp, _, first = bad_rows_job
    base = [
        "--input",
        str(tmp / "in"),
        "--output",
        str(tmp / "out"),
        "--model",
        str(tiny_model_dir),
        "--address",
        cluster.address,
    ]
    again = run_job(cluster, tiny_model_dir, tmp / "in", tmp / "out", *BAD_JOB_ARGS[:2], *BAD_JOB_ARGS[4:])
    assert (again["parts_this_run"], again["parts_done_before"]) == (0, first["parts"])  # done; keeps its parts
    capsys.readouterr()
    for extra, says in (
        (["--truncate"], "truncate: was False, now True"),  # would embed the over-long row
        (["--dimensions", "32"], "dimensions: was None, now 32"),
        (["--rows-per-part", "25"], "rows_per_part: was 50, now 25"),
    ):
        assert cli.main(base + BAD_JOB_ARGS + extra) == 2
        assert says in capsys.readouterr().err
    assert cli.main(base + ["--max-tokens", "64"]) == 2  # no --instruction: another prompt
    assert "prompt: was" in capsys.readouterr().err
    extra_file = write_rows(tmp / "in/c.jsonl", "jsonl", [{"id": 999, "text": "one more"}])
    try:
        assert cli.main(base + BAD_JOB_ARGS) == 2
        assert "not what this output directory was started with (new: " in capsys.readouterr().err
    finally:
        extra_file.unlink()


def test_resume_with_nothing_to_do_answers_without_ray(bad_rows_job, tiny_model_dir):
    tmp, _, first = bad_rows_job
    argv = ["--input", str(tmp / "in"), "--output", str(tmp / "out"), "--model", str(tiny_model_dir), *BAD_JOB_ARGS]
    code = f"import sys\nfrom serve_app.corpus import cli\ncode = cli.main({argv!r})\nprint('ray', 'ray' in sys.modules)\nsys.exit(code)"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"({first['parts']} of {first['parts']} parts were already done)" in run.stdout
    assert run.stdout.endswith("ray False\n")  # never imported, let alone started
    assert run.stderr.splitlines()[-1].endswith(f"all {first['parts']} parts are already done: nothing to embed")


@pytest.mark.slow
def test_resume_after_kill_does_only_what_is_missing(cluster, tiny_model_dir, tmp_path):
    """A plain-text corpus (ids: row numbers), killed with SIGKILL mid-job, then run again
    (without --embedding-types: a resumed job keeps the types and the calibration it started with)."""
    from sentence_transformers.util.quantization import quantize_embeddings

    n, per_part = 6_000, 300
    write_rows(tmp_path / "in.txt", "text", [{"text": t} for t in make_texts(n, seed=4)])
    out = tmp_path / "out"
    args = ("--rows-per-part", str(per_part))
    cmd = command(cluster, tiny_model_dir, tmp_path / "in.txt", out, *args, "--embedding-types", "float,ubinary,int8")
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600  # generous: a loaded machine starts Ray and the actors slowly
        while len(done_parts(str(out))) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    time.sleep(1)  # let tasks of the dead job that were mid-write finish or die
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    assert 4 <= len(before) < n // per_part, "the kill should land mid-job"
    calibration = (out / "_calibration.json").read_bytes()

    resume = command(cluster, tiny_model_dir, tmp_path / "in.txt", out, *args)
    second = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    assert "corpus job complete" in second.stdout
    assert all(STATUS_LINE.match(line) for line in second.stderr.splitlines()), second.stderr[-5000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["parts_done_before"] == len(before)
    assert summary["parts_this_run"] == n // per_part - len(before)
    assert summary["rows"] == n - per_part * len(before)
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    assert {k: after[k] for k in before} == before  # nothing done before was redone
    ids, vectors, _ = read_output(out)
    assert len(ids) == len(set(ids)) == n and set(ids) == set(range(n))  # no duplicates, no gaps
    assert not list(out.glob(".tmp-*"))
    assert (out / "_calibration.json").read_bytes() == calibration and summary["embedding_types"] == [
        "float",
        "ubinary",
        "int8",
    ]
    ranges = CalibrationRanges.from_json(calibration).ranges[64]
    _, cols = columns_by_id(out, ["float", "ubinary", "int8"])
    for t in ("ubinary", "int8"):  # every part, before the kill and after, with the same ranges
        assert cols[t].tobytes() == quantize_embeddings(cols["float"], precision=t, ranges=ranges).tobytes(), t


QUANTISED = ["ubinary", "int8", "binary", "uint8"]


def columns_by_id(out: Path, types: list[str]) -> tuple[list, dict[str, np.ndarray]]:
    """Each ``embedding_<type>`` column (and ``embedding``, as float), rows in id order."""
    table = pq.read_table(out)
    order = np.argsort(table.column("id").to_pylist(), kind="stable")
    cols = {}
    for t in types:
        name = "embedding" if t == "float" else f"embedding_{t}"
        col = table.column(name).combine_chunks()
        cols[t] = np.asarray(col.flatten()).reshape(len(table), -1)[order]
    return sorted(table.column("id").to_pylist()), cols


def test_quantised_columns_equal_the_services_answers_for_the_same_texts(
    cluster, tiny_model_dir, tiny_encoder, tmp_path
):
    """--embedding-types: one column per type, calibrated on the corpus; /v2/embed with the job's file gives the same."""
    from sentence_transformers.util.quantization import quantize_embeddings

    from tests.http_fakes import InProcessEncoder, client_for, make_service

    texts = make_texts(300, seed=6)
    inp = write_rows(tmp_path / "in.jsonl", "jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])
    out = tmp_path / "out"
    types = "float," + ",".join(QUANTISED)
    args = ("--embedding-types", types, "--dimensions", "32", "--rows-per-part", "100", "--calibration-rows", "150")
    summary = run_job(cluster, tiny_model_dir, inp, out, *args)
    assert summary["embedding_types"] == ["float", *QUANTISED]
    assert summary["bytes_per_row"] == {"float": 128, "ubinary": 4, "int8": 32, "binary": 4, "uint8": 32}
    manifest = json.loads((out / "_corpus.json").read_text())
    assert manifest["settings"]["embedding_types"] == ["float", *QUANTISED]
    calibration = CalibrationRanges.load(out / "_calibration.json")
    assert calibration.sample_size == 150 and sorted(calibration.ranges) == [32, 64]
    table = pq.read_table(out)
    assert table.schema.field("embedding_ubinary").type == pa.list_(pa.uint8(), 4)
    assert table.schema.field("embedding_int8").type == pa.list_(pa.int8(), 32)

    ids, cols = columns_by_id(out, ["float", *QUANTISED])
    assert ids == list(range(len(texts)))
    np.testing.assert_allclose(cols["float"], tiny_encoder.encode(texts, dimensions=32), atol=1e-6)
    for t in QUANTISED:  # the definitions: sentence-transformers' quantize_embeddings, with the file's ranges
        want = quantize_embeddings(cols["float"], precision=t, ranges=calibration.ranges[32])
        assert cols[t].astype(want.dtype).tobytes() == want.tobytes(), t

    svc = make_service(
        tiny_model_dir, InProcessEncoder(tiny_encoder), calibration_ranges=str(out / "_calibration.json")
    )
    body = {
        "model": tiny_model_dir.name,
        "texts": texts[:50],
        "input_type": "search_document",
        "embedding_types": ["float", *QUANTISED],
        "output_dimension": 32,
    }

    async def ask():
        async with client_for(svc) as client:
            return (await client.post("/v2/embed", json=body)).json()["embeddings"]

    online = asyncio.run(ask())
    np.testing.assert_allclose(np.array(online["float"], np.float32), cols["float"][:50], atol=1e-6)
    for t in QUANTISED:
        assert np.array_equal(np.array(online[t]), cols[t][:50]), t


def test_quantized_search_example_runs_as_written(cluster, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """docs/quantized-search.md: its corpus, its job command (against this test's Ray), its search code."""
    import shlex

    doc = (ROOT / "docs" / "quantized-search.md").read_text()
    python_blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    bash = re.findall(r"```bash\n(.*?)```", doc, re.S)[0].replace("\\\n", " ")
    job_line = next(line for line in bash.splitlines() if "-m serve_app.corpus" in line)
    job_args = shlex.split(
        job_line.split("-m serve_app.corpus", 1)[1].replace("/tmp/kalm-standin", str(tiny_model_dir))
    )
    monkeypatch.chdir(tmp_path)
    exec(python_blocks[0], {})
    assert cli.main([*job_args, "--address", cluster.address, "--progress-interval", "1"]) == 0
    capsys.readouterr()
    exec(python_blocks[1], {})
    printed = capsys.readouterr().out
    assert "64 dims: 256 B float, 8 B ubinary per document" in printed
    only, rescored = (float(x) for x in re.findall(r"recall@10 .*: ([0-9.]+)", printed))
    assert 0 <= only <= rescored <= 1
    assert (tmp_path / "vectors" / "_calibration.json").exists()


def _store_stats(address: str):
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    return get_memory_info_reply(get_state_from_address(address)).store_stats


@pytest.mark.slow
def test_corpus_larger_than_the_object_store(cluster, tiny_model_dir, tmp_path):
    n = 36_000
    texts = make_texts(n, seed=5, words=(3, 12))
    rng = random.Random(5)
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:  # each row carries a large field the job must stream past
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": i, "text": t, "html": "".join(rng.choices("abcdefgh <>/", k=2500))}) + "\n")
    assert path.stat().st_size > OBJECT_STORE_BYTES + 8 * 1024 * 1024
    before = _store_stats(cluster.address)
    summary = run_job(cluster, tiny_model_dir, path, tmp_path / "out", "--rows-per-part", "2000")
    after = _store_stats(cluster.address)
    assert summary["embedded"] == n
    assert after.spilled_bytes_total == before.spilled_bytes_total  # streamed: nothing spilled to disk
    assert after.object_store_bytes_fallback == 0
    ids, _, _ = read_output(tmp_path / "out")
    assert sorted(ids) == list(range(n))


def test_benchmark_mode_compares_with_sentence_transformers(cluster, tiny_model_dir, tmp_path, capsys):
    inp = write_rows(tmp_path / "in.jsonl", "jsonl", [{"id": i, "text": t} for i, t in enumerate(make_texts(800))])
    options = CorpusOptions(str(inp), str(tmp_path / "out"), model=str(tiny_model_dir), address=cluster.address)
    result = benchmark(options)
    out = capsys.readouterr().out
    assert "sentence-transformers encode" in out and "corpus job, encoders loaded" in out
    assert result["texts"] == 800 and result["tokens"] > 0
    assert result["corpus_tokens_per_s"] > 0 and result["st_tokens_per_s"] > 0
    # the ratio is printed to 3 decimals; on this tiny input the job is mostly start-up, so it is small
    assert result["ratio"] == pytest.approx(
        result["corpus_tokens_per_s_steady"] / result["st_tokens_per_s"], rel=1e-2, abs=1e-3
    )
    with pytest.raises(CorpusError, match="needs a fresh output folder"):
        benchmark(options)
