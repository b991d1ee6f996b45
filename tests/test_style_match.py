"""evaluate.py --as WHO: the style match. A character n-gram classifier learns one person's turns
against everyone else's in the train split's dialogues and tells what share of each model's replies
read as that person's, between a ceiling (the person's own held-out replies) and a floor (the
others' held-out turns). A generated corpus of three people who write unmistakably differently,
split by create_dataset.py --as, and two tiny GPT-2 models trained from scratch: one on the
person's answers only, one on everyone's."""
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import create_dataset
import evaluate
import train_transformer as tt

pytestmark = pytest.mark.usefixtures("one_thread")

WHEN = ["завтра", "вечером", "в субботу", "утром", "после работы", "на выходных", "сегодня", "в пятницу"]
WHAT = ["поедем на дачу", "купим хлеба", "посмотрим фильм", "починим машину", "сходим в кино", "позвоним маме",
        "закажем пиццу", "пойдём в парк", "уберём квартиру", "приготовим ужин", "поиграем в футбол",
        "напишем отчёт", "встретим гостей", "погуляем с собакой", "съездим в город", "купим подарок"]
HOW = ["с друзьями", "вместе", "без спешки", "если будет время", "как договаривались", "наконец"]


def content(rng):
    return f"{rng.choice(WHEN)} {rng.choice(WHAT)} {rng.choice(HOW)}"


def casual(rng):  # Вадим: "чё", "ваще", and ")))" at the end of every message
    c = content(rng)
    return rng.choice([f"чё {c} ваще)))", f"{c} ваще)))", f"чё, {c})))", f"ну чё {c}, ваще норм)))"])


def formal(rng):  # Борис: "Добрый день. ... С уважением"
    c = content(rng)
    return f"Добрый день. {c[0].upper() + c[1:]}. С уважением, Борис."


def lowercase(rng):  # Света: lower case, no punctuation
    return f"{content(rng)} {rng.choice(['ну', 'короче', 'да', 'вот'])}"


VADIM, BORIS, SVETA = "user1|Вадим Петров", "user2|Борис Ильин", "user3|Света"
STYLES = {VADIM: casual, BORIS: formal, SVETA: lowercase}
TINY = ["--from-scratch", "--device", "cpu", "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
        "--vocab-size", "400", "--n-positions", "128", "--seed", "0"]


def write_dialogues(path, seed=0, speakers=True, owner=None):
    """40 dialogues of Вадим with Борис or Света, 60 of Борис with Света, 4 to 6 turns each."""
    rng = random.Random(seed)
    pairs = [(VADIM, BORIS), (BORIS, VADIM), (VADIM, SVETA), (SVETA, VADIM)] * 10 + [(BORIS, SVETA),
                                                                                      (SVETA, BORIS)] * 30
    rows = []
    for dialogue_id, (first, second) in enumerate(pairs):
        who = [first if k % 2 == 0 else second for k in range(rng.randint(4, 6))]
        rows.append({"sample": [STYLES[p](rng) for p in who], "dialogue_id": dialogue_id, "source": "generated",
                     **({"speakers": who} if speakers else {})})
    table = pa.Table.from_pylist(rows)
    if owner:
        table = table.replace_schema_metadata({b"owner": json.dumps(owner, ensure_ascii=False).encode()})
    pq.write_table(table, path)
    return path


def splits(tmp, dialogues, who=None):
    out = tmp / ("as" if who else "all")
    argv = ["--input", str(dialogues), "--output", str(out), "--no-facts", "--test-fraction", "0.25"]
    assert create_dataset.main(argv + (["--as", who] if who else [])) == 0
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The dialogues, the --as splits, and the two models."""
    tmp = tmp_path_factory.mktemp("style")
    dialogues = write_dialogues(tmp / "clean_dialogues.parquet")
    as_data, all_data = splits(tmp, dialogues, "Вадим Петров"), splits(tmp, dialogues)
    models = {}
    for name, data in (("vadim", as_data), ("everyone", all_data)):
        models[name] = tmp / f"m_{name}"
        assert tt.main(TINY + ["--data-dir", str(data), "--output", str(models[name]), "--max-steps", "100",
                               "--eval-steps", "100", "--logging-steps", "50", "--batch-size", "16", "--lr", "3e-3",
                               "--save-total-limit", "1"]) == 0
    probe = tmp / "probe.jsonl"
    probe.write_text(json.dumps({"id": "p1", "turns": ["Меня зовут Аня.", "Привет, Аня!", "Как меня зовут?"],
                                 "fact": ["Аня"]}, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"tmp": tmp, "dialogues": dialogues, "data": as_data, "models": models, "probe": probe}


def run_evaluate(corpus, output, *extra):
    return evaluate.main(["--model", str(corpus["models"]["vadim"]), str(corpus["models"]["everyone"]),
                          "--data-dir", str(corpus["data"]), "--dialogues", str(corpus["dialogues"]),
                          "--probe", str(corpus["probe"]), "--output", str(output), "--quiet",
                          "--max-new-tokens", "24", "--rows", "10", *extra])


def one_line_error(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("evaluate.py: error: ")
    return err[0]


# ---------------------------------------------------------------- the classifier alone
def test_classifier_tells_the_person_from_the_others_on_fixed_texts():
    rng = random.Random(1)
    own = [casual(rng) for _ in range(60)]
    others = [formal(rng) for _ in range(30)] + [lowercase(rng) for _ in range(30)]
    classifier = evaluate.train_style_classifier(own, others, seed=0)
    ceiling = evaluate.style_share(classifier, [casual(rng) for _ in range(40)])
    floor = evaluate.style_share(classifier, [formal(rng) for _ in range(20)] + [lowercase(rng) for _ in range(20)])
    assert ceiling >= 0.9 and floor <= 0.1, (ceiling, floor)
    assert evaluate.style_share(classifier, ["", "   "]) == 0.0  # an empty reply is nobody's
    again = evaluate.train_style_classifier(own, others, seed=0)
    texts = [casual(rng) for _ in range(10)] + [formal(rng) for _ in range(10)]
    assert list(again.predict_proba(texts)[:, 1]) == list(classifier.predict_proba(texts)[:, 1])


def test_who_resolves_as_create_dataset_does(tmp_path):
    path = write_dialogues(tmp_path / "d.parquet", owner={"key": "user1", "name": "Вадим Петров"})
    dialogues, owner = evaluate.read_dialogues(path)
    for who in ("user1", "Вадим Петров", "вадим  петров", "Вадим", "me"):
        assert evaluate.resolve_as(dialogues, owner, [who], path) == {"keys": ["user1"], "names": ["Вадим Петров"]}
    with pytest.raises(evaluate.UserError, match="matches no speaker; speakers: .*Вадим Петров \\(user1\\) \\d+ turns"):
        evaluate.resolve_as(dialogues, owner, ["Пётр"], path)
    with pytest.raises(evaluate.UserError, match="owner record"):
        evaluate.resolve_as(dialogues, None, ["me"], path)


@pytest.mark.parametrize("who", ["user1", "Вадим Петров", "вадим петров", "Вадим", " Вадим ", "me", "Пётр",
                                 "user2", "Борис"])
def test_evaluate_and_create_dataset_resolve_a_name_alike(tmp_path, who):
    """The two scripts each hold their own --as resolution (one reads a ParquetFile as it streams, the
    other the whole table): on the same file they must name the same person, or both refuse."""
    path = write_dialogues(tmp_path / "d.parquet", owner={"key": "user1", "name": "Вадим Петров"})
    dialogues, owner = evaluate.read_dialogues(path)
    results = []
    for resolve in (lambda: evaluate.resolve_as(dialogues, owner, [who], path),
                    lambda: create_dataset.resolve_voice(create_dataset.open_input(path), path, [who])):
        try:
            results.append(resolve())
        except (evaluate.UserError, create_dataset.UserError):
            results.append("refused")
    assert results[0] == results[1], results


# ---------------------------------------------------------------- evaluate.py --as end to end
def test_style_match_ranks_the_persons_model_above_everyones(corpus, tmp_path, capsys):
    assert run_evaluate(corpus, tmp_path / "r1", "--as", "Вадим Петров") == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "r1" / "comparison.json").read_text(encoding="utf-8"))
    style = result["style"]
    vadim, everyone = (style["models"][str(corpus["models"][k])] for k in ("vadim", "everyone"))
    print("style:", json.dumps(style, ensure_ascii=False))  # the figures, for the record (pytest -s)
    assert style["as"] == ["Вадим Петров"] and style["keys"] == ["user1"]
    assert style["ceiling"] > style["floor"]
    assert vadim["style_match"] >= 2 * everyone["style_match"] and vadim["style_match"] > 0
    assert style["floor"] <= vadim["style_match"] <= style["ceiling"]
    assert vadim["answer_perplexity"] < everyone["answer_perplexity"]
    assert "style match (share of replies that read as Вадим Петров): " in printed
    ceiling, floor = style["ceiling"], style["floor"]
    assert f"ceiling {ceiling:.2f} (Вадим Петров's own held-out replies), floor {floor:.2f}" in printed
    markdown = (tmp_path / "r1" / "comparison.md").read_text(encoding="utf-8")
    assert "| style match |" in markdown and "Style match (`--as`)" in markdown
    rows = {row["model"]: row for row in result["models"]}
    assert rows[str(corpus["models"]["vadim"])]["style_match"] == vadim["style_match"]

    # a second run gives the same figures
    assert run_evaluate(corpus, tmp_path / "r2", "--as", "user1") == 0
    again = json.loads((tmp_path / "r2" / "comparison.json").read_text(encoding="utf-8"))["style"]
    assert again == style


def test_unknown_name_lists_the_speakers(corpus, tmp_path, capsys):
    assert run_evaluate(corpus, tmp_path / "r", "--as", "Пётр") == 1
    line = one_line_error(capsys)
    assert "'Пётр' matches no speaker" in line
    for listed in ("Вадим Петров (user1)", "Борис Ильин (user2)", "Света (user3)"):
        assert listed in line
    assert not (tmp_path / "r").exists()


def test_as_on_dialogues_without_speakers_is_one_line(corpus, tmp_path, capsys):
    bare = write_dialogues(tmp_path / "bare.parquet", speakers=False)
    assert run_evaluate(corpus, tmp_path / "r", "--as", "Вадим Петров", "--dialogues", str(bare)) == 1
    assert "no 'speakers' column" in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_a_classifier_that_cannot_tell_the_person_apart_is_said_to(tmp_path):
    style = {"as": ["Вадим"], "ceiling": 0.0, "floor": 0.0, "held_out_replies": 3,
             "models": {"m": {"style_match": 0.67, "answer_perplexity": 9.0}}}
    lines = evaluate.style_lines(style)
    assert lines[0].startswith("the classifier does not tell Вадим from the others") and len(lines) == 3
    assert len(evaluate.style_lines({**style, "ceiling": 0.9, "floor": 0.1})) == 2

