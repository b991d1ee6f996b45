"""The fast generation path of system_prompt.py / tg_bot.py (int8 linear layers,
threads) and batching across chats in tg_bot.py: the model thread's batcher on a
stub, batched generation against one prompt at a time on a tiny trained model,
and the real bot process batching chats that write at once.

Speed is not tested here (bench/generation.py and bench/bot_load.py measure it);
these tests check that the fast and batched paths give the replies the plain path
gives."""
import copy
import functools
import json
import re
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_model  # noqa: E402  (lead-owned helper in tests/)
from fake_bot_api import FakeBotApi, LiveBot  # noqa: E402

import system_prompt as sp  # noqa: E402
import tg_bot  # noqa: E402

torch.set_num_threads(1)
GREEDY = {"max_new_tokens": 12, "do_sample": False, "temperature": 0.7, "top_p": 0.9, "top_k": 50,
          "repetition_penalty": 1.15, "no_repeat_ngram_size": 3}
HISTORIES = [["Привет! Как дела?"],
             ["Какая завтра погода?"],
             ["Меня зовут Аня, я живу в Казани.", "Очень приятно, Аня!", "Что приготовить на ужин?"],
             ["Как перезагрузить телефон?"]]
TRAIN_STEPS = 150
TOKEN = "13579:FAST-test-token"
RESULT_TIMEOUT = 30  # seconds; only so that a batcher that waits forever fails instead of hanging


def train_tiny_model(folder):
    """The tests' tiny model trained until it has learnt its five exchanges in the
    chat prompt format: its next-token distributions are peaked like a real
    model's, unlike random weights, where every logit is nearly a tie and any
    rounding can flip the greedy choice."""
    folder = tiny_model.build_tiny_model(folder)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = GPT2LMHeadModel.from_pretrained(folder)
    lines = tiny_model.TRAINING_LINES
    rows = []
    for question, answer in zip(lines[0::2], lines[1::2]):
        # The prompt rule's ids, as the trainers build them and the chat feeds them.
        rows.append(sp.fit_prompt(tokenizer, [question[len("Вопрос: "):]], 1, 10_000)
                    + sp.answer_ids(tokenizer, answer[len("Ответ: "):]))
    width = max(map(len, rows))
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(row) for row in rows])[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(TRAIN_STEPS):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    folder = train_tiny_model(tmp_path_factory.mktemp("trained") / "model")
    config = json.loads((folder / "chat_config.json").read_text(encoding="utf-8"))
    config["generation"] = dict(GREEDY)
    (folder / "chat_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return folder


def loaded(folder, quantize):
    chat = sp.open_model_folder(folder, "cpu")
    return sp.load_weights(chat, quantize, threads=1)


@pytest.fixture(scope="module")
def plain(trained_dir):
    return loaded(trained_dir, "none")


@pytest.fixture(scope="module")
def int8(trained_dir):
    return loaded(trained_dir, "int8")


def settings_for(persona=None, **generation):
    return {"generation": dict(GREEDY, **generation), "persona": persona, "facts": None,
            "max_turns": tiny_model.CHAT_CONFIG["max_turns"], "budget": 192}


def prompts_for(chat):
    # Without the persona: the format the tiny model learnt, so its replies differ by prompt.
    return [sp.chat_prompt_ids(history, settings_for(), chat["tokenizer"]) for history in HISTORIES]


# --- the int8 path
def test_conv1d_becomes_linear_with_the_same_outputs(plain):
    model = copy.deepcopy(plain["model"])
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.inference_mode():
        before = model(ids).logits
        sp.conv1d_to_linear(model)
        after = model(ids).logits
    assert not any(isinstance(module, Conv1D) for module in model.modules())
    assert sum(isinstance(module, torch.nn.Linear) for module in model.modules()) == 4 * 2 + 1  # 2 blocks + head
    assert torch.allclose(before, after, atol=1e-5)


def test_the_fused_gelu_is_the_same_function(plain, int8):
    from transformers.activations import NewGELUActivation
    model = copy.deepcopy(plain["model"])
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.inference_mode():
        before = model(ids).logits
        sp.fuse_gelu(model)
        after = model(ids).logits
    assert [type(block.mlp.act) for block in model.transformer.h] == [torch.nn.GELU] * 2
    assert not any(isinstance(m, NewGELUActivation) for m in int8["model"].modules())  # the fast path fuses it
    assert torch.allclose(before, after, atol=1e-5)


@pytest.mark.skipif(not sp.int8_activations_full_range(), reason="this CPU has no VNNI: torch's int8 kernel "
                    "keeps its 7-bit activations here, so there is no 8-bit path to compare")
def test_int8_activations_get_eight_bits_and_a_smaller_error(trained_dir, plain, int8):
    """torch's dynamic int8 layers round activations to 7 bits unless told otherwise; with VNNI the
    fast path gives them all 8 (issue 23: a third of the logit error on GPT-2). The same weights
    with torch's 7-bit layers must be further from fp32 on the learnt prompts."""
    model = copy.deepcopy(plain["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(sp.conv1d_to_linear(sp.fuse_gelu(model)), {
            torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, inplace=True)
    layers = [m for m in int8["model"].modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert layers and all(isinstance(m.forward, functools.partial) for m in layers)
    errors = {"8 bits": 0.0, "7 bits": 0.0}
    with torch.inference_mode():
        for prompt in prompts_for(plain):
            ids = torch.tensor([prompt])
            exact = plain["model"](ids).logits
            errors["8 bits"] = max(errors["8 bits"], (int8["model"](ids).logits - exact).abs().max().item())
            errors["7 bits"] = max(errors["7 bits"], (model(ids).logits - exact).abs().max().item())
    assert 0 < errors["8 bits"] < errors["7 bits"], errors


def test_int8_quantizes_every_linear_layer_and_stays_close(plain, int8):
    quantized = torch.ao.nn.quantized.dynamic.Linear
    kinds = [type(module) for module in int8["model"].modules()]
    assert kinds.count(quantized) == 4 * 2 + 1 and torch.nn.Linear not in kinds and Conv1D not in kinds
    # Without the Conv1D conversion the quantizer would reach the output layer only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks this API deprecated (see quantize_int8)
        raw = torch.ao.quantization.quantize_dynamic(copy.deepcopy(plain["model"]), {torch.nn.Linear})
    assert [type(m) for m in raw.modules()].count(quantized) == 1
    ids = torch.tensor([prompts_for(plain)[2]])
    with torch.inference_mode():
        exact, approx = plain["model"](ids).logits, int8["model"](ids).logits
    error = ((exact - approx).pow(2).mean().sqrt() / exact.std()).item()
    assert 0 < error < 0.05  # int8 really runs, and its error is small


def test_int8_greedy_replies_match_fp32(plain, int8):
    """int8 rounding can only flip the greedy choice where two tokens are nearly
    tied. On the questions the tiny model learnt nothing is near a tie, and every
    reply must match fp32 token for token; on questions it never saw, and behind the
    persona, ties can occur, so there at most two of the sixteen replies may differ.
    bench/generation.py counts them on a model of ruGPT-3 small's shape."""
    learnt = [line[len("Вопрос: "):] for line in tiny_model.TRAINING_LINES[0::2]]
    questions = learnt + ["Как дела?", "Расскажи анекдот", "Где ты живёшь?", "Сколько времени?"]
    settings = settings_for()
    differing = 0
    for persona in (None, tiny_model.CHAT_CONFIG["persona"]):
        for question in questions:
            prompt = sp.chat_prompt_ids([question], settings_for(persona), plain["tokenizer"])
            exact = sp.generate_ids(plain, settings, [prompt])[0]
            fast = sp.generate_ids(int8, settings, [prompt])[0]
            if persona is None and question in learnt:
                assert fast == exact, question
            else:
                differing += fast != exact
    assert differing <= 2
    prompt = sp.chat_prompt_ids([questions[1]], settings, plain["tokenizer"])
    assert sp.generate_reply(int8, settings, prompt) == sp.generate_reply(plain, settings, prompt)


def test_the_sampler_draws_from_transformers_distribution():
    """Temperature, top-k, top-p as transformers' own warpers apply them: the same
    tokens possible, at the same rates."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    torch.manual_seed(3)
    scores = torch.randn(1, 400) * 3
    draws = 4000
    for temperature, top_k, top_p in ((0.7, 50, 0.9), (1.0, 5, 1.0), (1.3, 0, 0.5)):
        warped = scores.clone()
        for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None,
                       TopPLogitsWarper(top_p)):
            warped = warper(None, warped) if warper else warped
        expected = warped.softmax(-1)[0]
        sampler = sp.TopKTopPSampler(temperature, top_k, top_p)
        picked = sampler(None, scores.expand(draws, -1).clone())
        assert (torch.isfinite(picked).sum(-1) == 1).all()  # one token a row, greedy search takes it
        counts = torch.bincount(picked.argmax(-1), minlength=400).float() / draws
        assert set(counts.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())
        assert (counts - expected).abs().max() < 0.03, (temperature, top_k, top_p)


def test_quantize_choice(trained_dir):
    assert sp.choose_quantization("auto", "cpu") == "int8"
    assert sp.choose_quantization("auto", "cuda") == "none"
    assert sp.choose_quantization("none", "cpu") == "none"
    with pytest.raises(sp.UserError, match="CPU only"):
        sp.choose_quantization("int8", "cuda")
    assert sp.physical_cores() >= 1
    chat = sp.load_weights(sp.open_model_folder(trained_dir, "cpu"), "auto", threads=1)
    assert chat["quantize"] == "int8" and chat["threads"] == 1 and torch.get_num_threads() == 1


def test_system_prompt_flags(trained_dir, tmp_path, capsys):
    script = tmp_path / "chat.txt"
    script.write_text("Как дела?\n", encoding="utf-8")
    replies = []
    for quantize in ("none", "int8"):
        assert sp.main(["--model", str(trained_dir), "--script", str(script), "--quantize", quantize,
                        "--threads", "1"]) == 0
        replies.append([line for line in capsys.readouterr().out.splitlines() if line.startswith("Бот: ")])
    assert replies[0] == replies[1] and len(replies[0]) == 1
    assert sp.main(["--model", str(trained_dir), "--script", str(script), "--threads", "-1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("system_prompt.py: error: ") and "--threads" in err[0]


# --- batched generation
def test_a_batch_gives_each_prompt_its_own_reply(plain):
    prompts = prompts_for(plain)
    settings = settings_for()
    alone = [sp.generate_ids(plain, settings, [prompt])[0] for prompt in prompts]
    assert len({tuple(ids) for ids in alone}) == len(prompts)  # the replies depend on the prompt
    assert len({len(p) for p in prompts}) > 1  # so the batch is padded
    assert sp.generate_ids(plain, settings, prompts) == alone
    assert sp.generate_ids(plain, settings, prompts[::-1]) == alone[::-1]
    assert sp.generate_replies(plain, settings, prompts) == [sp.generate_reply(plain, settings, p) for p in prompts]


def test_a_row_that_stops_early_does_not_cut_the_others(plain):
    prompts = prompts_for(plain)
    settings = settings_for(max_new_tokens=10)
    full = [sp.generate_ids(plain, settings, [prompt])[0] for prompt in prompts]
    # Make a token that the first reply writes early, and another reply never writes,
    # the end-of-sequence token: the first row stops there, the other must run on.
    position, token, other = next((k, t, j) for k, t in enumerate(full[0][1:], 1) if t not in full[0][:k]
                                  for j in range(1, len(full)) if t not in full[j] and len(full[j]) == 10)
    chat = dict(plain, tokenizer=copy.deepcopy(plain["tokenizer"]))
    chat["tokenizer"].eos_token = chat["tokenizer"].convert_ids_to_tokens(token)
    assert chat["tokenizer"].eos_token_id == token != plain["tokenizer"].pad_token_id
    alone = [sp.generate_ids(chat, settings, [prompt])[0] for prompt in prompts]
    together = sp.generate_ids(chat, settings, prompts)
    assert together == alone
    assert together[0] == full[0][:position]       # stopped at its own EOS ...
    assert together[other] == full[other]           # ... while another row ran all its 10 tokens


# --- the model thread's batcher, on a stub model
class StubModel:
    """generate(prompts) that records each batch and can hold the first one."""

    def __init__(self, hold_first=False, fail=False):
        self.batches, self.fail = [], fail
        self.started, self.release = threading.Event(), threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, prompts, on_text=None):
        self.batches.append(list(prompts))
        self.started.set()
        assert self.release.wait(RESULT_TIMEOUT)
        if self.fail:
            raise RuntimeError("model fell over")
        return [f"ответ на «{prompt}»" for prompt in prompts]


def result_within_timeout(request):
    done = threading.Thread(target=request.result, daemon=True)
    done.start()
    done.join(RESULT_TIMEOUT)
    assert not done.is_alive(), "the batcher never answered"
    return request.result()


def test_a_lone_request_goes_at_once():
    model = StubModel()
    batcher = tg_bot.ReplyBatcher(model, max_batch=8, max_wait=3600)  # a wait it must not spend
    assert result_within_timeout(batcher.submit("привет")) == "ответ на «привет»"
    batcher.close()
    assert model.batches == [["привет"]]


def test_requests_that_come_while_busy_go_together_up_to_the_cap():
    model = StubModel(hold_first=True)
    batcher = tg_bot.ReplyBatcher(model, max_batch=4, max_wait=3600)
    first = batcher.submit("p0")
    assert model.started.wait(RESULT_TIMEOUT)
    later = [batcher.submit(f"p{i}") for i in range(1, 11)]
    model.release.set()
    assert result_within_timeout(first) == "ответ на «p0»"
    assert [result_within_timeout(request) for request in later] == [f"ответ на «p{i}»" for i in range(1, 11)]
    batcher.close()
    assert model.batches == [["p0"], ["p1", "p2", "p3", "p4"], ["p5", "p6", "p7", "p8"], ["p9", "p10"]]


def test_a_batch_holds_at_most_max_tokens():
    model = StubModel(hold_first=True)
    # rows are counted at the longest prompt plus a 10-token reply: 3 x (90 + 10) = 300 fits, 4 x 100 does not
    batcher = tg_bot.ReplyBatcher(model, max_batch=8, max_wait=0, max_tokens=300, reply_tokens=10)
    first = batcher.submit("p0", tokens=1000)  # alone over the cap: it still goes
    assert model.started.wait(RESULT_TIMEOUT)
    later = [batcher.submit(f"p{i}", tokens) for i, tokens in enumerate([20, 90, 40, 10, 30, 290], 1)]
    model.release.set()
    for request in [first] + later:
        result_within_timeout(request)
    batcher.close()
    assert model.batches == [["p0"], ["p1", "p2", "p3"], ["p4", "p5"], ["p6"]]


def test_a_batch_waits_for_announced_prompts_only():
    model = StubModel()
    batcher = tg_bot.ReplyBatcher(model, max_batch=8, max_wait=3600)
    batcher.announce()
    batcher.announce()
    batcher.announce()
    a = batcher.submit("a", announced=True)
    b = batcher.submit("b", announced=True)
    batcher.withdraw()  # the third turned out to be a command: nobody waits for it
    assert result_within_timeout(a) == "ответ на «a»" and result_within_timeout(b) == "ответ на «b»"
    batcher.close()
    assert model.batches == [["a", "b"]]


def test_the_wait_for_announced_prompts_is_capped():
    model = StubModel()
    batcher = tg_bot.ReplyBatcher(model, max_batch=8, max_wait=0.05)
    batcher.announce()  # never submitted
    assert result_within_timeout(batcher.submit("x")) == "ответ на «x»"
    batcher.close()
    assert model.batches == [["x"]]


def test_an_error_reaches_every_request_of_the_batch():
    model = StubModel(hold_first=True, fail=True)
    batcher = tg_bot.ReplyBatcher(model, max_batch=8, max_wait=0)
    first = batcher.submit("p0")
    assert model.started.wait(RESULT_TIMEOUT)
    later = [batcher.submit("p1"), batcher.submit("p2")]
    model.release.set()
    for request in [first] + later:
        assert request.done.wait(RESULT_TIMEOUT)
        with pytest.raises(RuntimeError, match="fell over"):
            request.result()
    batcher.close()
    assert model.batches == [["p0"], ["p1", "p2"]]


# --- the real bot: chats that write at once are batched, each gets its own reply
def test_the_bot_batches_chats_and_each_gets_the_reply_it_would_get_alone(trained_dir, plain, tmp_path):
    chats = list(range(301, 307))
    questions = {chat_id: line[len("Вопрос: "):] for chat_id, line in
                 zip(chats, tiny_model.TRAINING_LINES[0::2] + ["Как дела?"])}
    with FakeBotApi(TOKEN) as api:
        for chat_id in chats:  # queued before the bot starts: its first getUpdates takes them all
            api.push_text(chat_id, questions[chat_id])
        bot = LiveBot(api, TOKEN, tmp_path, ["--model", str(trained_dir), "--db", str(tmp_path / "h.sqlite3"),
                                             "--max-batch", "8", "--batch-wait-ms", "2000", "--quantize", "none",
                                             "--poll-seconds", "1", "--log-prompts", "--log-level", "DEBUG"])
        try:
            bot.start()
            replies = {chat_id: api.wait_for_messages(chat_id, 1)[0]["text"] for chat_id in chats}
        finally:
            assert bot.stop() == 0
    log = bot.log_text()
    sizes = [int(size) for size in re.findall(r"batch of (\d+): ", log)]
    assert sum(sizes) == len(chats) and max(sizes) > 1, sizes
    for chat_id in chats:
        [prompt] = bot.prompts(chat_id)
        assert prompt.endswith(f"Вопрос: {questions[chat_id]}\nОтвет:")
        ids = sp.encode_text(plain["tokenizer"], prompt)
        assert replies[chat_id] == sp.generate_reply(plain, settings_for(tiny_model.CHAT_CONFIG["persona"]), ids), \
            chat_id
    assert len(set(replies.values())) > 1
