"""GGUF export and llama.cpp generation on a CPU, against torch fp32 `generate`, on a model of
ruGPT-3 small's shape (12 layers, 768 wide, 12 heads, 50264 rows, 2048 positions) with seeded random
weights (the real ones cannot be downloaded here) and the tiny tokenizer of tests/tiny_model.py
(its 400 tokens, the rest of the rows exported as unused [PADn] tokens, as a padded vocabulary is).

It prints, for f16 and q8_0: export seconds, the file's size and its ratio to fp32 safetensors; and,
where llama-cpp-python is installed, tokens per second of a greedy reply at batch size one (prompt
and new tokens, every reply the same length) for llama.cpp and torch on the same threads, runs
interleaved, medians, as ratios to torch in this run.

llama.cpp's speed depends on how it was built: a wheel built with CMAKE_ARGS="-DGGML_NATIVE=OFF"
(portable) lacks the AVX2 dot products that make q8_0 faster than f16 on a CPU. The greedy agreement
on random weights is a weak check (their logits are near ties); tests/test_export_gguf.py compares
the two runtimes on a trained tiny model.

    python bench/gguf_serving.py                     # a few minutes on 2 cores
    python bench/gguf_serving.py --new-tokens 64 --repeats 5 --threads 2
"""
import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import export_gguf  # noqa: E402  (the stage under test)
from tests.tiny_model import build_tiny_tokenizer, CHAT_CONFIG  # noqa: E402

N_LAYER, N_EMBD, N_HEAD, VOCAB_SIZE, N_POSITIONS = 12, 768, 12, 50264, 2048  # ruGPT-3 small
PROMPT_TOKENS = 48
NEW_TOKENS = 32
REPEATS = 3
THREADS = 1
SEED = 0


def build_folder(folder, seed):
    import json

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=N_POSITIONS, n_embd=N_EMBD, n_layer=N_LAYER,
                        n_head=N_HEAD, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "chat_config.json").write_text(json.dumps(CHAT_CONFIG, ensure_ascii=False), encoding="utf-8")
    return folder


def torch_reply(model, ids, new_tokens):
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)[0, len(ids):].tolist()


def llama_reply(llm, ids, new_tokens):
    llm.reset()
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == new_tokens:
            return out
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench/gguf_serving.py")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp) / "small", args.seed)
        fp32_bytes = (folder / "model.safetensors").stat().st_size
        print(f"model: {N_LAYER} x {N_EMBD}, {VOCAB_SIZE} rows; fp32 safetensors {fp32_bytes / 2**20:.0f} MiB")
        paths = {}
        for kind in ("f16", "q8_0"):
            paths[kind] = Path(tmp) / f"small.{kind}.gguf"
            with contextlib.redirect_stdout(io.StringIO()) as printed, contextlib.redirect_stderr(io.StringIO()):
                seconds, code = timed(lambda: export_gguf.main(["--model", str(folder), "--type", kind,
                                                                "--output", str(paths[kind])]))
            if code:
                sys.exit(f"export to {kind} failed")
            check = [line for line in printed.getvalue().splitlines() if "check" in line]
            size = paths[kind].stat().st_size
            print(f"{kind}: export {seconds:.1f} s, {size / 2**20:.0f} MiB ({size / fp32_bytes:.2f} of fp32); "
                  + "; ".join(check))
        try:
            import llama_cpp
        except ImportError:
            print("llama-cpp-python is not installed: no generation figures (pip install llama-cpp-python)")
            return 0
        model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(4, 400, (args.prompt_tokens,), generator=generator).tolist()
        runners = {"torch fp32": lambda: torch_reply(model, ids, args.new_tokens)}
        for kind, path in paths.items():
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=args.prompt_tokens + args.new_tokens + 8,
                                  n_threads=args.threads, n_batch=args.prompt_tokens, verbose=False)
            runners[f"llama.cpp {kind}"] = lambda llm=llm: llama_reply(llm, ids, args.new_tokens)
        seconds = {name: [] for name in runners}
        replies = {}
        for _ in range(args.repeats):  # interleaved: a busy machine slows every runner alike
            for name, run in runners.items():
                took, replies[name] = timed(run)
                seconds[name].append(took)
        base = statistics.median(seconds["torch fp32"])
        tokens = args.prompt_tokens + args.new_tokens
        for name in runners:
            median = statistics.median(seconds[name])
            same = sum(a == b for a, b in zip(replies[name], replies["torch fp32"]))
            print(f"{name}: {tokens / median:.1f} tokens/s (prompt {args.prompt_tokens} + {args.new_tokens} new), "
                  f"{base / median:.2f}x torch; greedy tokens equal to torch's: {same}/{args.new_tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
