"""The real bot under load, three scenarios in one run.

batching: twenty chats writing at once: replies per second and latency, one
reply at a time (--max-batch 1) against batched (the bot's default --max-batch).

serving: the same twenty chats, three bots: the model in the bot's process with
replies sent whole (--no-stream), the same streamed (the default: drafts growing
about once a second), and the bot asking an inference server (--server) started here on
the same model folder, on the same CPU: `transformers serve` (--backend transformers, the
default) or llama.cpp's llama-server (--backend llama-server: the folder exported to a Q8_0
GGUF by export_gguf.py, served by .llama/bin/llama-server (deploy/build_llama_server.sh) with
as many slots as the bot's --max-batch, the same threads, and --ignore-eos so that its replies
have the fixed length too; each reply's length is read from its log).
Time to the first visible text (the first draft, message or edit a chat gets
after its message), streamed against sent whole, as a ratio; replies per second
and p95 latency of the whole reply, server against in-process, as ratios.

flood: one chat writes normally (each message a second after the reply to the one
before; a fresh chat in each phase, so that its prompts grow alike) while another
floods the bot (--flood-rate messages a second, until the
normal chat is done or for at most --flood-seconds: a bot that cannot keep up would
otherwise never see the end of it), with
Telegram's limit of about one message a second per chat emulated (a faster send
to the same chat gets a 429 "retry after"). The normal chat's p95 latency with the
flood against without it (before and after the flood, whose difference shows the
noise), as a ratio. --bot-script runs another copy of tg_bot.py in this scenario,
e.g. an older version taken from git, for a before/after comparison.

The bot is tg_bot.py itself, a subprocess talking to the fake Bot API server of
the tests (tests/fake_bot_api.py), as in the end-to-end tests. Its model has
ruGPT-3 small's shape (12 layers, 768 wide, 12 heads, 2048 positions) with
seeded random weights, saved to a temporary folder with a byte-level BPE
tokenizer of 50257 tokens trained here (on the bundled sample dialogues and
made-up syllables, since ruGPT-3's own cannot be downloaded). Its chat_config.json
sets min_new_tokens = max_new_tokens, so every reply has the same length whatever
the weights say; the bot's debug log confirms it for every batch.

Each chat writes, waits for the reply, and writes again (--rounds times); all
chats start together. Latency is from a message's arrival at the server to the
reply's; replies per second count every reply over the whole run. All runs use
the bot's fast path (int8 on a CPU) and its default threads.

    python bench/bot_load.py                           # all three scenarios, about 12 minutes on 2 cores
    python bench/bot_load.py --scenario serving        # streamed against whole, server against in-process
    python bench/bot_load.py --scenario serving --backend llama-server --rounds 1   # llama-server Q8_0 instead
    python bench/bot_load.py --scenario batching --chats 20 --rounds 3 --new-tokens 32 --batch 16
    python bench/bot_load.py --scenario flood --flood-rounds 20 --flood-rate 5
    git show 2292eb2:tg_bot.py > /tmp/tg_bot_old.py   # the bot before issue 12, for comparison:
    python bench/bot_load.py --scenario flood --flood-rounds 10 --flood-seconds 30 --bot-script /tmp/tg_bot_old.py
"""
import argparse
import contextlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from fake_bot_api import FakeBotApi, LiveBot  # noqa: E402  (the tests' fake server and bot runner)

# ----------------------------------------------------------------------------
# defaults
N_LAYER, N_EMBD, N_HEAD, N_POSITIONS, VOCAB_SIZE = 12, 768, 12, 2048, 50257  # ruGPT-3 small
CHATS = 20
ROUNDS = 2
NEW_TOKENS = 64             # the kit's default reply length (chat_config.json's max_new_tokens)
TOKEN = "24680:BENCH-token"
SAMPLE = REPO / "data" / "sample_dialogues.jsonl"
SYLLABLE_LINES = 40_000     # enough text for 50257 BPE tokens
REPLY_TIMEOUT = 900         # seconds; a reply this late means the bot is stuck
SEED = 0
FLOOD_ROUNDS = 20           # messages the normal chat writes in each phase of the flood scenario
FLOOD_RATE = 5.0            # messages a second from the flooding chat
FLOOD_SECONDS = 120.0       # the flood stops after this, or when the normal chat is done, whichever first
THINK_SECONDS = 1.0         # the normal chat writes this long after a reply, as a person would
CHAT_SEND_INTERVAL = 1.0    # Telegram answers faster sends to one chat with 429
NORMAL_CHAT, FLOOD_CHAT = 2001, 2002
BATCH_LINE = re.compile(r"batch of \d+: ([\d,]+) new tokens in ([\d.]+) s")
SERVE = Path(sys.executable).with_name("transformers")  # `transformers serve`, beside this Python
SERVER_START_SECONDS = 600
SERVER_TIMEOUT = 900        # the bot's --server-timeout: transformers serve queues the twenty chats' requests
BACKEND = "transformers"    # the serving scenario's server: "transformers" (transformers serve) or "llama-server"
LLAMA_SERVER = REPO / ".llama" / "bin" / "llama-server"  # deploy/build_llama_server.sh builds it
GGUF_TYPE = "q8_0"          # the GGUF llama-server serves (export_gguf.py --type)
SLOT_TOKENS = 512           # llama-server's context per slot: persona, four turns and a reply fit
LLAMA_DEFAULT_MAX_BATCH = 16  # tg_bot.py's DEFAULT_MAX_BATCH: llama-server's slots where --batch is not given
# a request's generation line (not its "prompt eval time" line): ms, new tokens
LLAMA_EVAL_LINE = re.compile(r"(?<!prompt )\beval time =\s*([\d.]+) ms /\s*(\d+) tokens")
LLAMA_PROMPT_LINE = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
VISIBLE = ("sendMessage", "sendMessageDraft", "editMessageText")
# ----------------------------------------------------------------------------


def train_tokenizer(seed):
    """A byte-level BPE of VOCAB_SIZE tokens. Real Russian lines (repeated, so that
    their words become tokens, as in ruGPT-3's vocabulary) and made-up syllable
    words to fill the rest."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    lines = []
    if SAMPLE.is_file():
        for line in SAMPLE.read_text(encoding="utf-8").splitlines():
            lines += json.loads(line)["sample"]
    lines += ["Вопрос: Кто ты?", "Ответ: Я дружелюбный помощник. Отвечаю коротко и по делу."]
    rng = random.Random(seed)
    syllables = [c + v for c in "бвгдзклмнпрстфхцчшщ" for v in "аеиоуыэюя"]
    made_up = [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(12))
               for _ in range(SYLLABLE_LINES)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines * 20 + made_up, vocab_size=VOCAB_SIZE, min_frequency=1, show_progress=False,
                            special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def write_model_folder(folder, new_tokens, seed):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer(seed)
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, n_positions=N_POSITIONS,
                        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    import train_transformer  # the folder's tokenizer as the trainers save it, for a server to read
    train_transformer.prepare_folder_tokenizer(tokenizer, {"max_turns": 4}, None)
    tokenizer.save_pretrained(folder)
    chat_config = {"format_version": 1, "question_label": "Вопрос: ", "answer_label": "Ответ: ", "turn_separator": "\n",
                   "persona": {"question": "Кто ты?", "answer": "Я дружелюбный помощник. Отвечаю коротко и по делу."},
                   "context_tokens": N_POSITIONS - new_tokens, "max_turns": 4, "prompt_rule": 2,
                   "generation": {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": True,
                                  "temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.15,
                                  "no_repeat_ngram_size": 3}}
    (folder / "chat_config.json").write_text(json.dumps(chat_config, ensure_ascii=False, indent=2), encoding="utf-8")
    return len(tokenizer), sum(p.numel() for p in model.parameters())


def first_visible(api, chat_id, since, reply):
    """When the chat first saw something of the reply to a message sent at `since`: its first
    draft or message (the reply itself when there was nothing before it)."""
    with api.lock:
        return min([reply["time"]] + [r["time"] for r in api.requests if r["chat_id"] == chat_id
                                      and r["status"] == 200 and r["method"] in VISIBLE and r["time"] >= since])


def chat_load(api, chats, rounds, firsts=None):
    """Every chat writes `rounds` messages, each after the reply to the one before;
    (latencies, seconds from the first message to the last reply). `firsts`, a list,
    gets the time from each message to the first text of its reply the chat saw."""
    latencies, lock = [], threading.Lock()
    start = threading.Barrier(len(chats) + 1)

    def talk(chat_id):
        start.wait()
        for number in range(rounds):
            api.push_text(chat_id, f"Сообщение {number + 1} из чата {chat_id}: расскажи что-нибудь интересное")
            sent = time.monotonic()
            reply = api.wait_for_messages(chat_id, number + 1, timeout=REPLY_TIMEOUT)[-1]
            with lock:
                latencies.append(reply["time"] - sent)
                if firsts is not None:
                    firsts.append(first_visible(api, chat_id, sent, reply) - sent)

    threads = [threading.Thread(target=talk, args=(chat_id,), daemon=True) for chat_id in chats]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.monotonic()
    for thread in threads:
        thread.join()
    return latencies, time.monotonic() - began


def run_bot(model_dir, workdir, name, bot_flags, chats, rounds, new_tokens):
    """One bot process under the load; its figures."""
    workdir = workdir / name
    workdir.mkdir()
    with FakeBotApi(TOKEN) as api:
        bot = LiveBot(api, TOKEN, workdir, ["--model", str(model_dir), "--db", str(workdir / "history.sqlite3"),
                                            "--poll-seconds", "1", "--log-level", "DEBUG"] + bot_flags)
        firsts = []
        try:
            bot.start(timeout=600)
            api.push_text(1, "Разминка")  # the first reply pays for allocations; not counted
            api.wait_for_messages(1, 1, timeout=REPLY_TIMEOUT)
            latencies, seconds = chat_load(api, chats, rounds, firsts)
        finally:
            code = bot.stop(timeout=REPLY_TIMEOUT)
    if code != 0:
        raise RuntimeError(f"the bot ({name}) exited with {code}; its log is in {workdir}")
    if "no reply from the inference server" in bot.log_text():
        raise RuntimeError(f"the bot ({name}) got no reply from the server for some messages; its log is in {workdir}")
    # The model thread logs "batch of N: <new tokens of each reply> new tokens in S s".
    found = BATCH_LINE.findall(bot.log_text())[1:]  # [1:]: the warm-up
    batches = [[int(n) for n in lengths.split(",")] for lengths, _ in found]
    timeline = " ".join(f"{len(batch)}:{float(seconds):.1f}s" for batch, (_, seconds) in zip(batches, found))
    short = sum(length < new_tokens for batch in batches for length in batch)
    replies = len(latencies)
    return {"name": name, "replies": replies, "seconds": seconds, "rate": replies / seconds,
            "p50": statistics.median(latencies), "p95": statistics.quantiles(latencies, n=20, method="inclusive")[18],
            "batches": len(batches), "mean_batch": sum(map(len, batches)) / max(1, len(batches)),
            "largest": max(map(len, batches), default=0), "short": short, "timeline": timeline,
            "first_p50": statistics.median(firsts), "first_p95": p95(firsts)}


def p95(values):
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def normal_chat(api, chat_id, rounds, think):
    """The chat writes `rounds` messages, each `think` s after the reply to the one
    before; the latencies, and the notices it got instead of replies."""
    latencies, notices = [], 0
    for number in range(rounds):
        count = len(api.messages_to(chat_id))
        api.push_text(chat_id, f"Сообщение {number + 1}: расскажи что-нибудь интересное")
        sent = time.monotonic()
        reply = api.wait_for_messages(chat_id, count + 1, timeout=REPLY_TIMEOUT)[-1]
        latencies.append(reply["time"] - sent)
        notices += not reply["text"].strip() or reply["text"].startswith(("Я ещё отвечаю", "Сейчас мне пишут"))
        time.sleep(think)
    return latencies, notices


def flood_chat(api, chat_id, rate, seconds, stop):
    """Messages from one chat at `rate` a second until `stop` is set or for `seconds`; how many."""
    sent, end = 0, time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < end:
        api.push_text(chat_id, f"флуд {sent}")
        sent += 1
        stop.wait(1.0 / rate)
    return sent


def run_flood(model_dir, workdir, bot_flags, rounds, rate, seconds, script=None):
    """One bot; the normal chat alone, with the flood, and alone again."""
    workdir = workdir / "flood"
    workdir.mkdir()
    phases = []
    with FakeBotApi(TOKEN) as api:
        api.chat_send_interval = CHAT_SEND_INTERVAL
        bot = LiveBot(api, TOKEN, workdir, ["--model", str(model_dir), "--db", str(workdir / "history.sqlite3"),
                                            "--poll-seconds", "1"] + bot_flags, script=script)
        try:
            bot.start(timeout=600)
            api.push_text(1, "Разминка")  # the first reply pays for allocations; not counted
            api.wait_for_messages(1, 1, timeout=REPLY_TIMEOUT)
            for number, (name, flooding) in enumerate((("quiet", False), ("flood", True), ("quiet again", False))):
                stop, flood = threading.Event(), {}
                if flooding:
                    before = len(api.messages_to(FLOOD_CHAT))
                    thread = threading.Thread(
                        target=lambda: flood.update(sent=flood_chat(api, FLOOD_CHAT, rate, seconds, stop)), daemon=True)
                    thread.start()
                began = time.monotonic()
                # A fresh chat each phase: its prompts grow alike, so the phases compare.
                latencies, notices = normal_chat(api, NORMAL_CHAT + 10 * number, rounds, THINK_SECONDS)
                seconds = time.monotonic() - began
                if flooding:
                    stop.set()
                    thread.join()
                    time.sleep(2)  # replies to the flood still on their way are not the next phase's
                    flood["answered"] = len(api.messages_to(FLOOD_CHAT)) - before  # replies and notices
                phases.append({"name": name, "latencies": latencies, "seconds": seconds, "notices": notices,
                               "p50": statistics.median(latencies), "p95": p95(latencies), **flood})
        finally:
            code = bot.stop(timeout=REPLY_TIMEOUT)
    if code != 0:
        raise RuntimeError(f"the bot (flood) exited with {code}; its log is in {workdir}")
    return phases


@contextlib.contextmanager
def model_server(model_dir, workdir, threads):
    """`transformers serve` pinned to the model folder on 127.0.0.1 (a port the kernel picks);
    its base URL once the model is loaded."""
    log_path = workdir / "serve.log"
    environ = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        environ["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen([str(SERVE), "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0",
                                    "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT, env=environ)
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while not (found := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log_path.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve did not start; its log is {log_path}")
            time.sleep(0.2)
        yield found.group(1)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.contextmanager
def llama_server(model_dir, workdir, threads, slots, binary, gguf_type):
    """llama.cpp's llama-server on 127.0.0.1 serving the folder exported by export_gguf.py: `slots`
    requests generated together (-np), the threads of the in-process bot, --ignore-eos (the in-process
    bot's min_new_tokens: fixed-length replies; the stop strings still cut both). Yields (base URL,
    a function that reads its log so far: each request's (prompt ms, prompt tokens, generation ms,
    new tokens))."""
    import io

    import export_gguf
    import requests

    gguf_path = workdir / f"model.{gguf_type}.gguf"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        export_gguf.export(model_dir, gguf_path, gguf_type)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    threads = threads or physical_cores()
    log_path = workdir / "llama-server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(binary), "-m", str(gguf_path), "--host", "127.0.0.1", "--port", str(port),
                                    "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c",
                                    str(slots * SLOT_TOKENS), "--ignore-eos", "--no-webui"],
                                   stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_SECONDS
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{binary} did not start; its log is {log_path}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.3)
        def timings():
            text = log_path.read_text(errors="replace")
            return [(float(p_ms), int(p_n), float(e_ms), int(e_n)) for (p_ms, p_n), (e_ms, e_n) in
                    zip(LLAMA_PROMPT_LINE.findall(text), LLAMA_EVAL_LINE.findall(text))]

        yield url, timings
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def physical_cores():
    """Cores this process may run on, SMT siblings counted once (the bot's default threads)."""
    import system_prompt

    return system_prompt.physical_cores()


def run_serving(model_dir, workdir, common, chats, rounds, new_tokens, threads, backend=BACKEND,
                binary=LLAMA_SERVER, slots=LLAMA_DEFAULT_MAX_BATCH, gguf_type=GGUF_TYPE):
    """In-process sent whole, in-process streamed, and through the server (streamed): transformers
    serve, or llama-server on a GGUF of the folder."""
    results = []
    for name, flags in (("in-process, whole", ["--no-stream"]), ("in-process, streamed", [])):
        results.append(run_bot(model_dir, workdir, name.replace(", ", "-"), flags + common, chats, rounds,
                               new_tokens))
        results[-1].update(name=name, flags=" ".join(flags) or "(defaults)", load=os.getloadavg()[0])
        print(f"  {name}: done in {results[-1]['seconds']:.0f} s", flush=True)
    (workdir / "serve").mkdir()
    if backend == "llama-server":
        with llama_server(model_dir, workdir / "serve", threads, slots, binary, gguf_type) as (url, lengths):
            flags = ["--server", url, "--server-timeout", str(SERVER_TIMEOUT)]
            results.append(run_bot(model_dir, workdir, "server-streamed", flags, chats, rounds, new_tokens))
            requests_seen = lengths()[2:]  # [2:]: the bot's one-token probe at its start, the warm-up reply
        results[-1].update(name=f"llama-server {gguf_type.upper()}", requests=requests_seen,
                           short=sum(n < new_tokens for *_, n in requests_seen),
                           flags=f"--server URL (-np {slots})")
    else:
        with model_server(model_dir, workdir / "serve", threads) as url:
            flags = ["--server", url, "--server-timeout", str(SERVER_TIMEOUT)]
            results.append(run_bot(model_dir, workdir, "server-streamed", flags, chats, rounds, new_tokens))
        results[-1].update(name="transformers serve", flags="--server URL")
    results[-1]["load"] = os.getloadavg()[0]
    print(f"  {results[-1]['name']}, streamed: done in {results[-1]['seconds']:.0f} s", flush=True)
    return results


def report_serving(results, chats, rounds, new_tokens):
    print(f"\nserving: {chats} chats at once, {rounds} messages each, replies of exactly {new_tokens} tokens; latency "
          f"from a message to the first text of its reply the chat sees, and to the whole reply")
    print(f"{'run':22} {'bot flags':24} {'replies':>7} {'replies/s':>10} {'first p50 s':>12} {'first p95 s':>12} "
          f"{'reply p50 s':>12} {'reply p95 s':>12} {'load after':>11}")
    for r in results:
        print(f"{r['name']:22} {r['flags']:24} {r['replies']:7d} {r['rate']:10.2f} {r['first_p50']:12.2f} "
              f"{r['first_p95']:12.2f} {r['p50']:12.2f} {r['p95']:12.2f} {r.get('load', 0):11.1f}")
    whole, streamed, server = results
    if "requests" in server:
        seen = server["requests"]
        print(f"{server['name']}: {len(seen)} replies in its log, new tokens {sorted(set(n for *_, n in seen))} "
              f"({server['short']} shorter than {new_tokens}: cut at a label the random model wrote); its own "
              f"timings, medians: prompt {statistics.median(p for p, *_ in seen):.0f} ms for "
              f"{statistics.median(n for _, n, *_ in seen):.0f} tokens, generation "
              f"{statistics.median(e / max(1, n) for *_, e, n in seen):.0f} ms per new token of a request "
              f"(the requests in its slots share each step)")
    print(f"time to the first visible text, streamed / sent whole: p50 "
          f"{streamed['first_p50'] / whole['first_p50']:.2f}x, p95 {streamed['first_p95'] / whole['first_p95']:.2f}x "
          f"(whole replies: p95 "
          f"{streamed['p95'] / whole['p95']:.2f}x)")
    print(f"{server['name']} / in-process (both streamed): replies per second {server['rate'] / streamed['rate']:.2f}x, "
          f"p95 of the whole reply {server['p95'] / streamed['p95']:.2f}x, p95 of the first text "
          f"{server['first_p95'] / streamed['first_p95']:.2f}x")


def report_flood(phases, rounds, rate, seconds, script):
    print(f"\nflood: a chat (a fresh one each phase) writes {rounds} messages, each {THINK_SECONDS:.0f} s after the reply; "
          f"in the middle phase chat {FLOOD_CHAT} sends {rate:g} messages a second (for at most {seconds:g} s); a send "
          f"to one chat sooner than {CHAT_SEND_INTERVAL:.0f} s after the last gets a 429; bot: {script or 'tg_bot.py'}")
    print(f"{'phase':12} {'replies':>7} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'notices':>8} {'flood sent':>11} "
          f"{'flood answered':>15}")
    for phase in phases:
        print(f"{phase['name']:12} {len(phase['latencies']):7d} {phase['p50']:7.2f} {phase['p95']:7.2f} "
              f"{max(phase['latencies']):7.2f} {phase['notices']:8d} {phase.get('sent', ''):>11} "
              f"{phase.get('answered', ''):>15}")
    quiet, flood, again = phases
    print(f"normal chat's p95 with the flood / without: {flood['p95'] / quiet['p95']:.2f}x "
          f"(against the later quiet phase {flood['p95'] / again['p95']:.2f}x; the two quiet phases differ by "
          f"{again['p95'] / quiet['p95']:.2f}x: the noise)")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", type=int, default=CHATS)
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="messages each chat writes, one after another")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="the fixed length of every reply")
    parser.add_argument("--batch", type=int, help="--max-batch of the batched run (default: the bot's default)")
    parser.add_argument("--threads", type=int, help="--threads of both bots (default: the bot's default)")
    parser.add_argument("--scenario", default="all", choices=("all", "batching", "flood", "serving"))
    parser.add_argument("--flood-rounds", type=int, default=FLOOD_ROUNDS,
                        help="messages the normal chat writes in each phase of the flood scenario")
    parser.add_argument("--flood-rate", type=float, default=FLOOD_RATE, help="messages a second from the flooding chat")
    parser.add_argument("--flood-seconds", type=float, default=FLOOD_SECONDS,
                        help="the longest the flood goes on (it also stops when the normal chat is done)")
    parser.add_argument("--bot-script", help="the tg_bot.py of the flood scenario (default: this checkout's)")
    parser.add_argument("--backend", default=BACKEND, choices=("transformers", "llama-server"),
                        help="the serving scenario's inference server (default %(default)s)")
    parser.add_argument("--llama-server", type=Path, default=LLAMA_SERVER,
                        help="the llama-server binary of --backend llama-server (default %(default)s)")
    parser.add_argument("--gguf-type", default=GGUF_TYPE, choices=("f16", "q8_0"),
                        help="the GGUF llama-server serves (default %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.chats < 1 or args.rounds < 1 or args.new_tokens < 1 or args.flood_rounds < 2 or args.flood_rate <= 0 \
            or args.flood_seconds <= 0:
        print("bench/bot_load.py: error: --chats, --rounds and --new-tokens must be at least 1, --flood-rounds at "
              "least 2, --flood-rate and --flood-seconds above 0", file=sys.stderr)
        return 1
    if args.bot_script and not Path(args.bot_script).is_file():
        print(f"bench/bot_load.py: error: --bot-script {args.bot_script}: no such file", file=sys.stderr)
        return 1
    if args.scenario in ("all", "serving") and args.backend == "llama-server" \
            and not os.access(args.llama_server, os.X_OK):
        print(f"bench/bot_load.py: error: --llama-server {args.llama_server}: no llama-server there "
              f"(deploy/build_llama_server.sh builds one)", file=sys.stderr)
        return 1
    common = ["--threads", str(args.threads)] if args.threads else []
    batched = ["--max-batch", str(args.batch)] if args.batch else []
    chats = list(range(1001, 1001 + args.chats))
    print(f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="bot_load-") as tmp:
        tmp = Path(tmp)
        started = time.monotonic()
        vocab, params = write_model_folder(tmp / "model", args.new_tokens, args.seed)
        print(f"model folder: {N_LAYER} layers, {N_EMBD} wide, vocabulary {vocab}, {params / 1e6:.1f} M parameters, "
              f"random weights; written in {time.monotonic() - started:.0f} s", flush=True)
        results, phases, serving = [], None, None
        if args.scenario in ("all", "batching"):
            print(f"{args.chats} chats at once, {args.rounds} messages each (each after the reply to the one before), "
                  f"replies of exactly {args.new_tokens} tokens (sampling as in chat_config.json)", flush=True)
            for name, flags in (("one at a time", ["--max-batch", "1"] + common), ("batched", batched + common)):
                result = run_bot(tmp / "model", tmp, name.replace(" ", "-"), flags, chats, args.rounds,
                                 args.new_tokens)
                result["name"], result["flags"] = name, " ".join(flags) or "(defaults)"
                results.append(result)
                print(f"  {name}: done in {result['seconds']:.0f} s", flush=True)
        if args.scenario in ("all", "serving"):
            if args.backend == "transformers" and not SERVE.is_file():
                print(f"serving: {SERVE} is missing (pip install 'transformers[serving]'); scenario skipped")
            else:
                print(f"serving: {args.chats} chats at once, {args.rounds} messages each, server: {args.backend}",
                      flush=True)
                serving = run_serving(tmp / "model", tmp, batched + common, chats, args.rounds, args.new_tokens,
                                      args.threads, args.backend, args.llama_server,
                                      args.batch or LLAMA_DEFAULT_MAX_BATCH, args.gguf_type)
        if args.scenario in ("all", "flood"):
            phases = run_flood(tmp / "model", tmp, batched + common, args.flood_rounds, args.flood_rate,
                               args.flood_seconds, args.bot_script)
            print("  flood: done", flush=True)
    if results:
        report_batching(results, args.new_tokens)
    if serving:
        report_serving(serving, args.chats, args.rounds, args.new_tokens)
    if phases:
        report_flood(phases, args.flood_rounds, args.flood_rate, args.flood_seconds, args.bot_script)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


def report_batching(results, new_tokens):
    print(f"\n{'run':14} {'bot flags':26} {'replies':>7} {'seconds':>8} {'replies/s':>10} {'p50 s':>7} {'p95 s':>7} "
          f"{'batches':>8} {'mean batch':>11} {'largest':>8}")
    for r in results:
        print(f"{r['name']:14} {r['flags']:26} {r['replies']:7d} {r['seconds']:8.1f} {r['rate']:10.2f} {r['p50']:7.1f} "
              f"{r['p95']:7.1f} {r['batches']:8d} {r['mean_batch']:11.1f} {r['largest']:8d}")
    print("batches in order, size:seconds: " + " | ".join(f"{r['name']}: {r['timeline'][:300]}" for r in results))
    alone, together = results
    ratio = together["rate"] / alone["rate"]
    print(f"batched / one at a time: {ratio:.2f}x replies per second (goal: at least 3x: "
          f"{'met' if ratio >= 3 else 'NOT met'}); p95 latency {together['p95']:.1f} s against {alone['p95']:.1f} s "
          f"({'no worse' if together['p95'] <= alone['p95'] else 'WORSE'})")
    short = sum(r["short"] for r in results)
    print(f"replies shorter than {new_tokens} tokens (stopped at a label the random model happened to write): "
          f"{short}")


if __name__ == "__main__":
    sys.exit(main())
