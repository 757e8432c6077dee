"""The corpus job's status lines: each stage said once, the rows line kept fresh while embedding."""

from __future__ import annotations

import time

import pyarrow as pa

from serve_app.corpus.progress import Progress


def lines(capsys) -> list[str]:
    return [line.split(" ", 2)[2] for line in capsys.readouterr().err.splitlines()]


def summary(rows: int) -> pa.Table:
    return pa.Table.from_pylist(
        [{"rows": rows, "embedded": rows, "bad": 0, "tokens": 10 * rows, "ready_at": time.time(), "dtype": "float32"}]
    )


def test_each_stage_is_said_once_however_long_it_lasts(capsys):
    with Progress(interval=0.05) as progress:
        progress.stage("starting a local Ray")
        time.sleep(0.3)
        progress.stage("loading the model on 1 encoder actor")
        time.sleep(0.3)
    assert lines(capsys) == ["starting a local Ray", "loading the model on 1 encoder actor"]


def test_while_embedding_the_rows_line_is_repeated_and_the_final_one_said_once(capsys):
    with Progress(interval=0.05) as progress:
        progress.stage("loading the model")
        progress.start_embedding(total_rows=4, rows_before=0)
        time.sleep(0.2)  # no part yet: nothing to say
        progress.update(summary(2))
        time.sleep(0.3)
        progress.update(summary(2))
        progress.finish()
        progress.finish()
    said = lines(capsys)
    assert said[0] == "loading the model"
    assert all(line.startswith("2/4 rows") for line in said[1:-1]) and len(said) >= 4
    assert said[-1].startswith("4/4 rows (100.0%)")
