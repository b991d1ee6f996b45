"""The web chat under load: ten browser sessions writing at once, batched against one at a time.

system_prompt.py --web runs as a subprocess on a model folder of ruGPT-3 small's shape with
seeded random weights (bench/bot_load.py's builder: 12 layers, 768 wide, a 50257-token BPE
trained here; its chat_config.json sets min_new_tokens = max_new_tokens, so every reply has the
same length). Each session is an HTTP client of the page's own API (gradio_client, one Client a
session, as one browser tab is one): it writes, waits for the whole reply (streamed, as the page
shows it), and writes again, --rounds times; all sessions start together. Two runs of the same
script in one command: --max-batch 1 (one reply at a time) and batched (--batch, the page's
default when not given). Latency is from a message's submission to its last streamed text;
replies per second count every reply over the run. Both runs use the script's fast path (int8
on a CPU) and --threads (default: the script's, one per physical core).

    python bench/web_load.py                                 # 10 sessions x 2 rounds, 32 tokens: a few minutes
    python bench/web_load.py --sessions 10 --rounds 3 --new-tokens 64 --batch 10
"""
import argparse
import os
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
sys.path.insert(0, str(REPO / "bench"))

from bot_load import N_EMBD, N_LAYER, write_model_folder  # noqa: E402  (read-only: its model builder)

# ----------------------------------------------------------------------------
# defaults
SESSIONS = 10
ROUNDS = 2
NEW_TOKENS = 32
BATCH = None                # the batched run's --max-batch (None: system_prompt.py's default)
THREADS = 0                 # --threads for the script (0: its default, physical cores)
SEED = 0
START_SECONDS = 600         # the script loads torch, gradio and the model
REPLY_TIMEOUT = 900         # seconds; a reply this late means the page is stuck
MESSAGES = ["Привет! Как дела?", "Меня зовут Оля, я живу в Туле.", "Что посоветуешь почитать?",
            "А какая завтра погода?", "Расскажи что-нибудь интересное."]
# ----------------------------------------------------------------------------


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebChat:
    """system_prompt.py --web in a subprocess, its log in a file."""

    def __init__(self, model_dir, workdir, flags):
        self.port = free_port()
        self.log_path = workdir / f"web-{self.port}.log"
        self.log = open(self.log_path, "w", encoding="utf-8")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", GRADIO_ANALYTICS_ENABLED="False")
        self.process = subprocess.Popen([sys.executable, str(REPO / "system_prompt.py"), "--model", str(model_dir),
                                         "--web", "--port", str(self.port), *flags],
                                        stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}/"

    def wait_started(self):
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if "web chat on " in self.log_path.read_text(encoding="utf-8", errors="replace"):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"system_prompt.py --web did not start; its log: {self.log_path}")

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=REPLY_TIMEOUT)
        self.log.close()
        if code != 0:
            raise RuntimeError(f"system_prompt.py --web exited with {code}; its log: {self.log_path}")


def session(url, index, rounds, latencies, lock, ready):
    from gradio_client import Client

    client = Client(url, verbose=False)
    ready.wait()  # every client has the page's config: all sessions start writing together
    for round_ in range(rounds):
        sent = time.monotonic()
        job = client.submit(MESSAGES[(index + round_) % len(MESSAGES)], api_name="/chat")
        reply, _ = job.result(timeout=REPLY_TIMEOUT)
        took = time.monotonic() - sent
        if not reply.strip():
            raise RuntimeError(f"session {index}: an empty reply")
        with lock:
            latencies.append(took)


def run(model_dir, workdir, name, flags, sessions, rounds):
    """One page under the load; its figures."""
    from gradio_client import Client

    page = WebChat(model_dir, workdir, flags)
    try:
        page.wait_started()
        Client(page.url, verbose=False).predict("Разминка", api_name="/chat")  # allocations; not counted
        latencies, lock, ready, errors = [], threading.Lock(), threading.Barrier(sessions + 1), []

        def guarded(index):
            try:
                session(page.url, index, rounds, latencies, lock, ready)
            except Exception as error:  # reported after the run
                errors.append(error)
                ready.abort()

        threads = [threading.Thread(target=guarded, args=(i,)) for i in range(sessions)]
        for thread in threads:
            thread.start()
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            pass
        began = time.monotonic()
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - began
    finally:
        page.stop()
    if errors:
        raise RuntimeError(f"{name}: {errors[0]!r}")
    return {"name": name, "flags": " ".join(flags), "replies": len(latencies), "seconds": seconds,
            "rate": len(latencies) / seconds, "p50": statistics.median(latencies),
            "p95": statistics.quantiles(latencies, n=20, method="inclusive")[18]}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="bench/web_load.py", description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=SESSIONS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--batch", type=int, default=BATCH, help="the batched run's --max-batch")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--seed", type=int, default=SEED)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.sessions < 1 or args.rounds < 1 or args.new_tokens < 1:
        print("bench/web_load.py: error: --sessions, --rounds and --new-tokens must be at least 1", file=sys.stderr)
        return 1
    common = ["--threads", str(args.threads)] if args.threads else []
    batched = ["--max-batch", str(args.batch)] if args.batch else []
    print(f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="web_load-") as tmp:
        tmp = Path(tmp)
        started = time.monotonic()
        vocab, params = write_model_folder(tmp / "model", args.new_tokens, args.seed)
        print(f"model folder: {N_LAYER} layers, {N_EMBD} wide, vocabulary {vocab}, {params / 1e6:.1f} M parameters, "
              f"random weights; written in {time.monotonic() - started:.0f} s", flush=True)
        print(f"{args.sessions} sessions at once, {args.rounds} messages each (each after the reply to the one "
              f"before), replies of exactly {args.new_tokens} tokens", flush=True)
        results = []
        for name, flags in (("one at a time", ["--max-batch", "1"] + common), ("batched", batched + common)):
            results.append(run(tmp / "model", tmp, name, flags, args.sessions, args.rounds))
            print(f"  {name}: done in {results[-1]['seconds']:.0f} s", flush=True)
    print(f"\n{'run':14} {'page flags':24} {'replies':>7} {'seconds':>8} {'replies/s':>10} {'p50 s':>7} {'p95 s':>7}")
    for r in results:
        print(f"{r['name']:14} {r['flags'] or '(defaults)':24} {r['replies']:7d} {r['seconds']:8.1f} "
              f"{r['rate']:10.2f} {r['p50']:7.1f} {r['p95']:7.1f}")
    alone, together = results
    print(f"batched / one at a time: {together['rate'] / alone['rate']:.2f}x replies per second; p95 latency "
          f"{together['p95']:.1f} s against {alone['p95']:.1f} s ({together['p95'] / alone['p95']:.2f}x)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
