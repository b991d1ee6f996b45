"""The DeepSpeed configs in deepspeed/ (issue 15): what they say, that every "auto" in them is a value the
Trainer fills, and a one-process CPU run of the trainers with each, whose saved folder the other scripts
read (fp32, the chat's int8 path).

deepspeed is not in requirements.txt (a GPU install); where it is missing, or cannot start on this CPU
(its ops are compiled on first use, which needs a compiler), the tests that need it skip and say why."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import train_transformer as tt
from test_lora import write_base_without_pad
from test_train_transformer import PAIRS, write_pairs

CONFIGS = ("zero2.json", "zero3_offload.json")
# the keys transformers' DeepSpeed integration fills from TrainingArguments and the model (hidden size)
FILLED = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
          "fp16.enabled", "bf16.enabled", "optimizer.params.lr", "optimizer.params.betas", "optimizer.params.eps",
          "optimizer.params.weight_decay", "zero_optimization.reduce_bucket_size",
          "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold"}


def read_config(repo_root, name):
    return json.loads((repo_root / "deepspeed" / name).read_text(encoding="utf-8"))


def auto_keys(node, path=""):
    if isinstance(node, dict):
        return {key for name, value in node.items() for key in auto_keys(value, f"{path}{name}.")}
    return {path[:-1]} if node == "auto" else set()


def need_deepspeed():
    if not tt.package_installed("deepspeed"):
        pytest.skip("deepspeed is not installed (make test installs it from requirements-dev.txt; "
                    "pip install deepspeed): the DeepSpeed runs cannot start here")


def test_the_configs_are_zero2_and_zero3_with_cpu_offload(repo_root):
    zero2, zero3 = (read_config(repo_root, name) for name in CONFIGS)
    assert zero2["zero_optimization"]["stage"] == 2
    assert "optimizer" not in zero2 and "scheduler" not in zero2  # the Trainer's AdamW and cosine schedule
    zero = zero3["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "cpu"
    # without it, a ZeRO-3 save writes no usable weights
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    for config in (zero2, zero3):
        assert config["fp16"]["loss_scale"] == 0  # dynamic loss scaling on a GPU without bf16
        assert auto_keys(config) <= FILLED, auto_keys(config) - FILLED


@pytest.mark.parametrize("name", CONFIGS)
def test_the_trainer_fills_every_auto_value(repo_root, tmp_path, name):
    need_deepspeed()
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    args = tt.parse_args(["--output", str(tmp_path), "--device", "cpu", "--deepspeed",
                          str(repo_root / "deepspeed" / name)])
    config = HfTrainerDeepSpeedConfig(read_config(repo_root, name))
    config.trainer_config_process(tt.training_arguments(args, "cpu", 3e-5))
    model = type("Model", (), {"config": type("Config", (), {"hidden_size": 1024, "to_dict": lambda self: {}})()})()
    config.trainer_config_finalize(tt.training_arguments(args, "cpu", 3e-5), model, 1000)
    assert auto_keys(config.config) == set()
    assert config.get_value("train_micro_batch_size_per_gpu") == tt.BATCH_SIZE


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env():
    """What a launcher sets for one process (torchrun, accelerate launch, deepspeed)."""
    return dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def plain_env():
    env = dict(launcher_env())
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name)
    return env


PROBE = """
import json, sys
import deepspeed, torch
config = json.load(open(sys.argv[1]))
concrete = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "fp16.enabled": False, "bf16.enabled": False, "optimizer.params.lr": 1e-3,
            "optimizer.params.betas": [0.9, 0.999], "optimizer.params.eps": 1e-8, "optimizer.params.weight_decay": 0.0,
            "zero_optimization.reduce_bucket_size": 256, "zero_optimization.stage3_prefetch_bucket_size": 256,
            "zero_optimization.stage3_param_persistence_threshold": 16}
for key, value in concrete.items():
    node, *path = [config] + key.split(".")[:-1]
    for part in path:
        node = node.get(part, {})
    if node.get(key.split(".")[-1]) == "auto":
        node[key.split(".")[-1]] = value
model = torch.nn.Linear(16, 16)
optimizer = None if "optimizer" in config else torch.optim.AdamW(model.parameters())
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=model.parameters(), config=config)
loss = engine(torch.randn(2, 16)).sum()
engine.backward(loss)
engine.step()
print("probe ok", type(engine).__name__)
"""


def deepspeed_starts(config_path, cwd):
    """Skip, with DeepSpeed's own last line, where it cannot start on this CPU (say, no compiler for its ops)."""
    need_deepspeed()
    done = subprocess.run([sys.executable, "-c", PROBE, str(config_path)], cwd=cwd, env=launcher_env(),
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or "probe ok" not in done.stdout:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"DeepSpeed cannot start on this machine with {config_path.name}: {last}")


@pytest.mark.parametrize("name, lora, launcher", [("zero2.json", False, None), ("zero3_offload.json", True, "env"),
                                                  ("zero3_offload.json", False, "torchrun")],
                         ids=["zero2-full-plain-python", "zero3_offload-lora-launcher-env",
                              "zero3_offload-full-two-processes"])
def test_a_cpu_run_saves_a_folder_the_chat_reads(repo_root, tmp_path, name, lora, launcher):
    """One process with a launcher's environment (what torchrun, accelerate launch --use_deepspeed or deepspeed
    give it), one as plain `python <script> --deepspeed CONFIG`, for which the trainer sets that environment
    itself, and two processes under torchrun, whose ZeRO-3 shards are gathered for the save."""
    import system_prompt as sp
    from safetensors.torch import load_file

    config = repo_root / "deepspeed" / name
    deepspeed_starts(config, tmp_path)
    data = write_pairs(tmp_path / "data", PAIRS)
    out = tmp_path / "model"
    model = ["--lora", "--model", str(write_base_without_pad(tmp_path / "base"))] if lora else \
        ["--from-scratch", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--vocab-size", "400",
         "--n-positions", "128"]
    python = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(free_port())] if launcher == "torchrun" else [sys.executable]
    done = subprocess.run([*python, str(repo_root / "train_transformer.py"), *model, "--device", "cpu",
                           "--data-dir", str(data), "--output", str(out), "--max-steps", "4", "--eval-steps", "2",
                           "--batch-size", "4", "--deepspeed", str(config), "--seed", "0"],
                          cwd=tmp_path, env=launcher_env() if launcher == "env" else plain_env(), capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("--deepspeed with no launcher: one process" in done.stdout) is (launcher is None)
    assert done.stdout.count("done: step 4") == 1  # the main process reports; the others only train and save
    assert f"DeepSpeed {config}" in done.stdout
    weights = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float32 and t.numel() > 0 for t in weights.values())  # gathered, not shards
    chat = sp.load_weights(sp.open_model_folder(str(out), "cpu"), quantize="int8", threads=1)
    ids = torch.tensor([tt.fit_prompt(chat["tokenizer"], ["Где мои ключи?"], 1, 64, tt.PERSONA)])
    reply = chat["model"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                   do_sample=False)
    assert reply.shape[1] > ids.shape[1]
