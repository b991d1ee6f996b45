"""pytorch_chatbot.py: shifted teacher forcing, masking, overfitting 20 pairs, save/load, eval, bad input."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import pytorch_chatbot as pc
import tensorflow_chatbot as tc  # only its pure-Python tokeniser; TensorFlow itself is imported lazily

FIXTURE = Path(__file__).parent / "fixtures" / "lstm_pairs.csv"
# Small enough for seconds on one core, trained hard enough to memorise all 20 pairs.
TINY = ["--emb-dim", "32", "--hidden", "64", "--batch-size", "10", "--epochs", "40", "--lr", "0.03",
        "--patience", "100", "--seed", "1337", "--threads", "1", "--quiet", "--device", "cpu"]

TRICKY = ["Привет!!! Как дела?", "Ну... ладно, ё-моё", "Стоит 1 500 ₽.", "ЁЛКИ-ПАЛКИ!?",
          "«Кто-то» сказал: д'Артаньян — герой…", "  \tпробелы\nи перевод строки  ", "e-mail: a_b@c.ru",
          "Ответ: 42%", ""]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    for split in ("train", "val", "test"):
        shutil.copy(FIXTURE, folder / f"pairs_{split}.csv")
    return folder


@pytest.fixture(scope="module")
def pairs():
    return pc.read_pairs(FIXTURE)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """(model folder, in-memory model, vocabulary) after overfitting the 20 pairs."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("model") / "lstm_pytorch"
    args = pc.parse_args(["train", "--data-dir", str(data_dir), "--output", str(folder), *TINY])
    model, itos, _ = pc.run_train(args)
    return folder, model, itos


def test_tokenisers_of_both_scripts_agree():
    assert pc.TOKEN_PATTERN == tc.TOKEN_PATTERN
    assert pc.SPECIAL_TOKENS == tc.SPECIAL_TOKENS
    for text in TRICKY:
        assert pc.tokenize(text) == tc.tokenize(text), text
        assert pc.detokenize(pc.tokenize(text)) == tc.detokenize(tc.tokenize(text)), text
    assert pc.tokenize("Привет!!! Как дела?") == ["привет", "!!!", "как", "дела", "?"]
    assert pc.tokenize("Ну... ладно, ё-моё") == ["ну", "...", "ладно", ",", "ё-моё"]
    assert pc.tokenize("Стоит 1 500 ₽.") == ["стоит", "1", "500", "₽", "."]
    assert pc.detokenize(pc.tokenize("Ну... ладно, ё-моё!")) == "ну... ладно, ё-моё!"
    # A reply's text reads back as the very tokens the model wrote.
    for tokens in ([",", ",", ",", "."], ["да", "...", ".", "!", "?"], ["«", "ну", "»", ",", "ну", "!!!"]):
        assert pc.tokenize(pc.detokenize(tokens)) == tokens
        assert tc.detokenize(tokens) == pc.detokenize(tokens)


def test_decoder_reads_sos_and_predicts_eos_shifted_by_one():
    stoi = {tok: i for i, tok in enumerate(pc.build_vocab(["уже почти полночь ."], 50))}
    dec_in, target = pc.encode_answer("Уже почти полночь.", stoi, max_len=20)
    words = [stoi[w] for w in ["уже", "почти", "полночь", "."]]
    assert dec_in == [pc.SOS_ID] + words
    assert target == words + [pc.EOS_ID]
    # An answer cut at max_len must not be taught to stop where it was cut.
    dec_in, target = pc.encode_answer("Уже почти полночь.", stoi, max_len=3)
    assert target == words[:3] and dec_in == [pc.SOS_ID] + words[:2]
    # A long question keeps its end.
    assert pc.encode_question("уже почти полночь .", stoi, max_len=2) == words[2:]


def test_padding_is_masked_out_of_the_loss(pairs):
    torch.manual_seed(0)
    itos = pc.build_vocab([t for pair in pairs for t in pair], 1000)
    stoi = {tok: i for i, tok in enumerate(itos)}
    model = pc.Seq2Seq(len(itos), 16, 24).eval()
    items = pc.PairDataset(pairs[:6], stoi, 20).items
    src, src_len, dec_in, target = pc.collate(items)
    assert (target == pc.PAD_ID).any() and (src == pc.PAD_ID).any()  # the batch really has padding
    with torch.no_grad():
        batch_sum = pc.masked_loss(model(src, src_len, dec_in), target, reduction="sum").item()
        one_by_one = sum(pc.masked_loss(model(*pc.collate([item])[:3]), pc.collate([item])[3], reduction="sum").item()
                         for item in items)
    assert batch_sum == pytest.approx(one_by_one, rel=1e-5)


def test_overfit_20_pairs_greedy_reproduces_every_answer_and_stops(trained, pairs, tmp_path, capsys):
    folder, _, _ = trained
    script = tmp_path / "questions.txt"
    script.write_text("\n".join(q for q, _ in pairs) + "\nвыход\nэтот вопрос уже не читается\n", encoding="utf-8")
    capsys.readouterr()
    assert pc.main(["chat", "--model", str(folder), "--script", str(script), "--decoding", "greedy",
                    "--device", "cpu"]) == 0
    replies = capsys.readouterr().out.splitlines()
    assert replies == [pc.detokenize(pc.tokenize(a)) for _, a in pairs]
    bot = pc.load_model_folder(folder, torch.device("cpu"))
    for question, answer in pairs:
        ids, ended = bot.reply_ids(question)
        assert [bot.itos[i] for i in ids] == pc.tokenize(answer)
        assert ended, f"no <EOS> after {answer!r}"


def test_save_load_round_trip_gives_the_same_replies(trained, pairs):
    folder, model, itos = trained
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["kit_model"] == "lstm_pytorch" and config["format_version"] == 1
    assert json.loads((folder / "vocab.json").read_text(encoding="utf-8")) == itos
    in_memory = pc.Bot(model.eval(), itos, config, torch.device("cpu"))
    loaded = pc.load_model_folder(folder, torch.device("cpu"))
    for question, _ in pairs[:8]:
        assert loaded.reply(question) == in_memory.reply(question)
        # Sampling with the same seed draws the same words from the same distributions.
        sampled = [bot.reply(question, greedy=False, temperature=1.5, top_k=0,
                             generator=torch.Generator().manual_seed(7)) for bot in (in_memory, loaded)]
        assert sampled[0] == sampled[1]


def test_eval_writes_report_with_perfect_figures_on_memorised_pairs(trained, data_dir, pairs, tmp_path, capsys):
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    folder, _, _ = trained
    reports = tmp_path / "reports"
    assert pc.main(["eval", "--model", str(folder), "--data-dir", str(data_dir), "--report-dir", str(reports),
                    "--device", "cpu", "--quiet"]) == 0
    report = json.loads((reports / "lstm_pytorch.json").read_text(encoding="utf-8"))
    refs = [pc.tokenize(a) for _, a in pairs]
    # nltk charges short replies for their missing 4-grams, so an exact copy scores this, not 1.0.
    ceiling = corpus_bleu([[r] for r in refs], refs, smoothing_function=SmoothingFunction().method1)
    assert report["rows"] == 20
    assert report["bleu4"] == pytest.approx(ceiling)
    assert report["unigram_f1"] == pytest.approx(1.0)
    assert report["eos_rate"] == 1.0
    assert report["mean_reply_tokens"] == pytest.approx(sum(map(len, refs)) / 20)
    assert report["distinct_1"] == pytest.approx(len({t for r in refs for t in r}) / sum(map(len, refs)))
    assert 0 < report["ms_median"] <= report["ms_p95"]
    table = (reports / "lstm_pytorch.md").read_text(encoding="utf-8")
    assert "| BLEU-4" in table and f"{report['bleu4']:.4g}" in table
    assert table in capsys.readouterr().out


def test_predictions_interface_for_evaluate_py(trained, pairs, tmp_path):
    folder, _, _ = trained
    records = [{"id": "a", "context": [], "question": pairs[0][0], "reference": pairs[0][1]},
               {"id": "b", "context": ["Ну и денёк."], "question": pairs[1][0], "reference": "Совсем не то, что надо"},
               {"id": "c", "question": pairs[2][0], "reference": None}]
    questions, predictions = tmp_path / "q.jsonl", tmp_path / "p.jsonl"
    questions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert pc.main(["eval", "--model", str(folder), "--questions", str(questions), "--predictions",
                    str(predictions), "--seed", "1", "--device", "cpu", "--quiet"]) == 0
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    bot = pc.load_model_folder(folder, torch.device("cpu"))
    assert [row["id"] for row in rows] == ["a", "b", "c"]
    for row, record in zip(rows, records):
        assert set(row) == {"id", "reply", "ended_with_eos", "ms", "reply_tokens", "reference_nll",
                            "reference_tokens", "reference_chars"}
        text = " ".join(record.get("context", []) + [record["question"]])
        assert row["reply"] == bot.reply(text)[0]
        assert row["ms"] > 0 and row["reply_tokens"] == len(pc.tokenize(row["reply"]))
    assert rows[0]["reply"] == pc.detokenize(pc.tokenize(pairs[0][1])) and rows[0]["ended_with_eos"]
    assert rows[0]["reference_tokens"] == len(pc.tokenize(pairs[0][1])) + 1
    assert rows[0]["reference_chars"] == len(pairs[0][1]) + 1
    # A memorised answer is far likelier than an unrelated one.
    assert 0 < rows[0]["reference_nll"] < 1.0 < rows[1]["reference_nll"]
    assert rows[2]["reference_nll"] is None and rows[2]["reference_tokens"] is None
    assert rows[2]["reference_chars"] is None


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("fault", ["missing", "empty", "columns", "header only"])
def test_bad_csv_is_one_line_error_and_no_model(fault, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    if fault != "missing":
        text = {"empty": "", "columns": "dialogue_id,q,a\n1,Привет,Пока\n",
                "header only": "dialogue_id,question,answer\n"}[fault]
        _write(data / "pairs_train.csv", text)
        shutil.copy(FIXTURE, data / "pairs_val.csv")
    output = tmp_path / "lstm_pytorch"
    assert pc.main(["train", "--data-dir", str(data), "--output", str(output), *TINY]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pytorch_chatbot.py: error: ")
    assert "pairs_train.csv" in err
    assert not output.exists()


@pytest.mark.parametrize("config", [{"kit_model": "lstm_keras", "format_version": 1},
                                    {"kit_model": "lstm_pytorch", "format_version": 2},
                                    {"model_type": "gpt2"}, None])
def test_foreign_model_folder_is_one_line_error(config, data_dir, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    if config is not None:
        if config.get("kit_model") == "lstm_pytorch":
            config["token_pattern"] = pc.TOKEN_PATTERN
        _write(folder / "config.json", json.dumps(config))
    reports = tmp_path / "reports"
    assert pc.main(["eval", "--model", str(folder), "--data-dir", str(data_dir), "--report-dir", str(reports),
                    "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pytorch_chatbot.py: error: ") and str(folder) in err
    assert not reports.exists()


def test_train_refuses_to_overwrite_a_folder_that_is_not_a_model(data_dir, tmp_path, capsys):
    keep = _write(tmp_path / "precious" / "notes.txt", "не трогать")
    assert pc.main(["train", "--data-dir", str(data_dir), "--output", str(keep.parent), *TINY]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert keep.read_text(encoding="utf-8") == "не трогать"


def test_max_minutes_stops_training_and_keeps_a_loadable_model(data_dir, tmp_path):
    folder = tmp_path / "lstm_pytorch"
    assert pc.main(["train", "--data-dir", str(data_dir), "--output", str(folder), *TINY,
                    "--epochs", "100000", "--max-minutes", "0.02"]) == 0
    training = json.loads((folder / "config.json").read_text(encoding="utf-8"))["training"]
    assert training["stopped_by"] == "time limit" and training["epochs_run"] < 100000
    bot = pc.load_model_folder(folder, torch.device("cpu"))
    ids, ended = bot.reply_ids("Кто звонил?")
    # the saved weights are the ones loaded, and they reply in vocabulary words that
    # stop at <EOS> or at the length limit, the same on a second load
    saved = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    assert saved.keys() == bot.model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in bot.model.state_dict().items())
    assert all(len(pc.SPECIAL_TOKENS) <= i < len(bot.itos) for i in ids)
    assert ended or len(ids) == bot.max_len
    assert pc.load_model_folder(folder, torch.device("cpu")).reply_ids("Кто звонил?") == (ids, ended)
