"""tensorflow_chatbot.py: masking, the encoder/decoder split, overfitting 20 pairs, save/load, eval, bad input."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tensorflow_chatbot as tc

FIXTURE = Path(__file__).parent / "fixtures" / "lstm_pairs.csv"
# Tiny, but trained hard enough to memorise all 20 pairs; "auto" leaves GPU visibility alone
# so that this test does not hide GPUs from tests that run after it in the same process.
TINY = ["--emb-dim", "32", "--hidden", "64", "--batch-size", "10", "--epochs", "30", "--lr", "0.03",
        "--patience", "100", "--seed", "1337", "--threads", "1", "--quiet", "--device", "auto"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    for split in ("train", "val", "test"):
        shutil.copy(FIXTURE, folder / f"pairs_{split}.csv")
    return folder


@pytest.fixture(scope="module")
def pairs():
    return tc.read_pairs(FIXTURE)


@pytest.fixture(scope="module")
def tf():
    return tc.import_tensorflow("auto")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory, tf):
    """(model folder, in-memory model, vocabulary) after overfitting the 20 pairs."""
    folder = tmp_path_factory.mktemp("model") / "lstm_keras"
    args = tc.parse_args(["train", "--data-dir", str(data_dir), "--output", str(folder), *TINY])
    model, itos, _ = tc.run_train(args)
    return folder, model, itos


def test_decoder_reads_sos_and_predicts_eos_shifted_by_one(pairs):
    itos = tc.build_vocab([t for pair in pairs for t in pair], 1000)
    stoi = {tok: i for i, tok in enumerate(itos)}
    (questions, dec_in), target = tc.pairs_to_arrays(pairs[:2], stoi, max_len=8)
    words = [stoi[w] for w in tc.tokenize(pairs[1][1])]  # «Уже почти полночь.»
    assert list(dec_in[1]) == [tc.SOS_ID] + words + [tc.PAD_ID] * (8 - 1 - len(words))
    assert list(target[1]) == words + [tc.EOS_ID] + [tc.PAD_ID] * (8 - 1 - len(words))
    assert list(questions[1][:2]) == [stoi["который"], stoi["час"]]


def test_padding_is_masked_out_of_the_loss(pairs, tf):
    import keras

    keras.utils.set_random_seed(0)
    itos = tc.build_vocab([t for pair in pairs for t in pair], 1000)
    stoi = {tok: i for i, tok in enumerate(itos)}
    model = tc.build_model(len(itos), 16, 24)
    tc.compile_model(model, 1e-3)
    (q, d), y = tc.pairs_to_arrays(pairs[:6], stoi, max_len=12)
    (q2, d2), y2 = tc.pairs_to_arrays(pairs[:6], stoi, max_len=30)  # the same pairs, much more padding
    loss = model.evaluate([q, d], y, batch_size=6, verbose=0)
    assert model.evaluate([q2, d2], y2, batch_size=6, verbose=0) == pytest.approx(loss, rel=1e-4)
    # ... and it is the mean over real target tokens only.
    logits = np.asarray(model([q, d], training=False), dtype=np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    real = y != tc.PAD_ID
    picked = np.take_along_axis(log_probs, y[..., None].astype(int), -1)[..., 0]
    assert loss == pytest.approx(-picked[real].mean(), rel=1e-4)


def test_split_encoder_and_one_step_decoder_match_the_trained_model(trained, pairs, tf):
    _, model, itos = trained
    stoi = {tok: i for i, tok in enumerate(itos)}
    encoder, decoder = tc.split_for_inference(model)
    (q, d), _ = tc.pairs_to_arrays(pairs[3:4], stoi, max_len=20)
    q = tf.constant(q[:, : int((q[0] != tc.PAD_ID).sum())])
    length = int((d[0] != tc.PAD_ID).sum())
    d = tf.constant(d[:, :length])
    full = np.asarray(model([q, d], training=False))
    h, c = encoder(q, training=False)
    for step in range(length):
        logits, h, c = decoder([d[:, step:step + 1], h, c], training=False)
        np.testing.assert_allclose(np.asarray(logits)[0, 0], full[0, step], rtol=1e-4, atol=1e-4)


def test_overfit_20_pairs_greedy_reproduces_every_answer_and_stops(trained, pairs, tmp_path, capsys):
    folder, _, _ = trained
    script = tmp_path / "questions.txt"
    script.write_text("\n".join(q for q, _ in pairs) + "\nВыход\nэтот вопрос уже не читается\n", encoding="utf-8")
    capsys.readouterr()
    assert tc.main(["chat", "--model", str(folder), "--script", str(script), "--decoding", "greedy",
                    "--device", "auto"]) == 0
    replies = capsys.readouterr().out.splitlines()
    assert replies == [tc.detokenize(tc.tokenize(a)) for _, a in pairs]
    bot = tc.load_model_folder(folder, tc.import_tensorflow("auto"))
    for question, answer in pairs:
        ids, ended = bot.reply_ids(question)
        assert [bot.itos[i] for i in ids] == tc.tokenize(answer)
        assert ended, f"no <EOS> after {answer!r}"


def test_save_load_round_trip_gives_the_same_replies(trained, pairs, tf):
    folder, model, itos = trained
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["kit_model"] == "lstm_keras" and config["format_version"] == 1
    assert (folder / "model.keras").is_file()
    in_memory = tc.Bot(model, itos, config, tf)
    loaded = tc.load_model_folder(folder, tf)
    for question, _ in pairs[:6]:
        assert loaded.reply(question) == in_memory.reply(question)
        sampled = [bot.reply(question, greedy=False, temperature=1.5, top_k=0, generator=np.random.default_rng(7))
                   for bot in (in_memory, loaded)]
        assert sampled[0] == sampled[1]


def test_eval_writes_report_with_perfect_figures_on_memorised_pairs(trained, data_dir, pairs, tmp_path):
    from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu

    folder, _, _ = trained
    reports = tmp_path / "reports"
    assert tc.main(["eval", "--model", str(folder), "--data-dir", str(data_dir), "--report-dir", str(reports),
                    "--device", "auto", "--quiet"]) == 0
    report = json.loads((reports / "lstm_keras.json").read_text(encoding="utf-8"))
    refs = [tc.tokenize(a) for _, a in pairs]
    ceiling = corpus_bleu([[r] for r in refs], refs, smoothing_function=SmoothingFunction().method1)
    assert report["rows"] == 20 and report["bleu4"] == pytest.approx(ceiling)
    assert report["unigram_f1"] == pytest.approx(1.0) and report["eos_rate"] == 1.0
    assert report["distinct_2"] == pytest.approx(1.0)  # the 20 answers share no word pair
    assert 0 < report["ms_median"] <= report["ms_p95"]
    assert f"{report['unigram_f1']:.4g}" in (reports / "lstm_keras.md").read_text(encoding="utf-8")


def test_predictions_interface_for_evaluate_py(trained, pairs, tmp_path, tf):
    folder, _, _ = trained
    records = [{"id": "a", "context": [], "question": pairs[0][0], "reference": pairs[0][1]},
               {"id": "b", "context": ["Ну и денёк."], "question": pairs[1][0], "reference": "Совсем не то, что надо"},
               {"id": "c", "question": pairs[2][0], "reference": None}]
    questions, predictions = tmp_path / "q.jsonl", tmp_path / "p.jsonl"
    questions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert tc.main(["eval", "--model", str(folder), "--questions", str(questions), "--predictions",
                    str(predictions), "--seed", "1", "--device", "auto", "--quiet"]) == 0
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    bot = tc.load_model_folder(folder, tf)
    assert [row["id"] for row in rows] == ["a", "b", "c"]
    for row, record in zip(rows, records):
        assert set(row) == {"id", "reply", "ended_with_eos", "ms", "reply_tokens", "reference_nll",
                            "reference_tokens", "reference_chars"}
        assert row["reply"] == bot.reply(" ".join(record.get("context", []) + [record["question"]]))[0]
        assert row["ms"] > 0
    assert rows[0]["reply"] == tc.detokenize(tc.tokenize(pairs[0][1])) and rows[0]["ended_with_eos"]
    assert rows[0]["reference_tokens"] == len(tc.tokenize(pairs[0][1])) + 1
    assert 0 < rows[0]["reference_nll"] < 1.0 < rows[1]["reference_nll"]
    assert rows[2]["reference_nll"] is None and rows[2]["reference_chars"] is None


@pytest.mark.parametrize("fault", ["missing", "empty", "columns"])
def test_bad_csv_is_one_line_error_and_no_model(fault, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    if fault != "missing":
        text = {"empty": "", "columns": "dialogue_id,question,reply\n1,Привет,Пока\n"}[fault]
        (data / "pairs_train.csv").write_text(text, encoding="utf-8")
        shutil.copy(FIXTURE, data / "pairs_val.csv")
    output = tmp_path / "lstm_keras"
    assert tc.main(["train", "--data-dir", str(data), "--output", str(output), *TINY]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tensorflow_chatbot.py: error: ") and "pairs_train.csv" in err
    assert not output.exists()


@pytest.mark.parametrize("config", [{"kit_model": "lstm_pytorch", "format_version": 1},
                                    {"kit_model": "lstm_keras", "format_version": 0},
                                    {"model_type": "gpt2"}])
def test_foreign_model_folder_is_one_line_error(config, data_dir, tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    reports = tmp_path / "reports"
    assert tc.main(["eval", "--model", str(folder), "--data-dir", str(data_dir), "--report-dir", str(reports)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tensorflow_chatbot.py: error: ") and str(folder) in err
    assert not reports.exists()
