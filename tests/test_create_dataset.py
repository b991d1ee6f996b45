"""create_dataset.py: pairs and contexts from dialogues, split by dialogue."""
import csv

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cleaner_text
import create_dataset as cd
import parser_dataset


@pytest.fixture(scope="module")
def splits(tmp_path_factory, sample_path):
    folder = tmp_path_factory.mktemp("splits")
    raw, clean = folder / "raw.parquet", folder / "clean.parquet"
    assert parser_dataset.main(["--input", str(sample_path), "--output", str(raw), "--limit", "100"]) == 0
    assert cleaner_text.main(["--input", str(raw), "--output", str(clean)]) == 0
    assert cd.main(["--input", str(clean), "--output", str(folder)]) == 0
    return folder, clean


def test_no_dialogue_in_two_splits_and_every_pair_accounted(splits):
    folder, clean = splits
    ids = {}
    total = 0
    for split in cd.SPLITS:
        pairs = pd.read_csv(folder / f"pairs_{split}.csv")
        assert list(pairs.columns) == ["dialogue_id", "question", "answer"]
        ids[split] = set(pairs["dialogue_id"])
        total += len(pairs)
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    dialogues = pq.read_table(clean).to_pydict()["sample"]
    assert total == sum(len(d) - 1 for d in dialogues)
    assert all(ids[s] for s in cd.SPLITS)


def test_pairs_and_context_follow_the_dialogue(splits):
    folder, clean = splits
    table = pq.read_table(clean).to_pydict()
    by_id = dict(zip(table["dialogue_id"], table["sample"]))
    context = pd.read_parquet(folder / "context_train.parquet")
    pairs = pd.read_csv(folder / "pairs_train.csv")
    assert pq.read_schema(folder / "context_train.parquet").field("dialogue_id").type == pa.int64()
    assert len(context) == len(pairs)
    for (_, c), (_, p) in zip(context.iterrows(), pairs.iterrows()):
        turns = by_id[c["dialogue_id"]]
        i = turns.index(c["answer"])
        assert list(c["context"]) == turns[max(0, i - 4):i]
        assert p["question"] == turns[i - 1] and p["answer"] == turns[i]
    assert context["context"].map(len).max() == 4


def test_split_is_deterministic_and_seeded():
    a = [cd.split_of(i, 42, 0.1, 0.1) for i in range(2000)]
    assert a == [cd.split_of(i, 42, 0.1, 0.1) for i in range(2000)]
    assert a != [cd.split_of(i, 7, 0.1, 0.1) for i in range(2000)]
    assert 120 < a.count("test") < 280 and 120 < a.count("val") < 280


def test_rows_and_max_turns(tmp_path):
    src = tmp_path / "c.parquet"
    pq.write_table(pa.table({"sample": [["1", "2", "3", "4", "5", "6"]] * 10,
                             "dialogue_id": pa.array(range(10), pa.int64())}), src)
    assert cd.main(["--input", str(src), "--output", str(tmp_path), "--rows", "7", "--max-turns", "2"]) == 0
    frames = [pd.read_parquet(tmp_path / f"context_{s}.parquet") for s in cd.SPLITS]
    rows = pd.concat(frames)
    assert len(rows) == 7
    assert rows["context"].map(len).max() == 2
    assert sum(1 for s in cd.SPLITS for _ in csv.reader(open(tmp_path / f"pairs_{s}.csv"))) == 7 + 3


def test_bad_input_leaves_previous_files(tmp_path, capsys):
    keep = tmp_path / "pairs_train.csv"
    keep.write_text("old", encoding="utf-8")
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"turns": [["a", "b"]]}), wrong)
    assert cd.main(["--input", str(wrong), "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wrong.parquet" in err[0] and "missing column" in err[0]
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    assert cd.main(["--input", str(empty), "--output", str(tmp_path)]) == 1
    assert "empty" in capsys.readouterr().err
    assert keep.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
