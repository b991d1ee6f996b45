# Two commands do everything on a fresh machine:
#   make demo   - every stage of the kit on the bundled sample, one after another
#   make test   - the test suite
# Both create .venv and install requirements.txt into it first (make test also requirements-dev.txt,
# and builds llama.cpp's llama-server into .llama/ for the tests that serve a GGUF with it).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEV_STAMP := $(VENV)/.installed-dev-stamp

.PHONY: install blocks llama-server test demo demo-data demo-lstm demo-transformers demo-eval demo-chat bench clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $(STAMP)

# The tests also run the DeepSpeed and 8-bit optimizer paths, whose packages only they need.
# llama-cpp-python compiles llama.cpp: portable code (no -march=native), so a cached wheel runs on any x86-64.
$(DEV_STAMP): $(STAMP) requirements-dev.txt
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q -r requirements-dev.txt
	touch $(DEV_STAMP)

# llama.cpp's C++ server, for tests/test_llama_server.py and deploy/README.md's way of serving (minutes, once).
LLAMA_SERVER := .llama/bin/llama-server
$(LLAMA_SERVER): $(STAMP) deploy/build_llama_server.sh
	PYTHON=$(BIN)/python deploy/build_llama_server.sh $(LLAMA_SERVER)

llama-server: $(LLAMA_SERVER)

install: $(STAMP)

# Shared code lives once in blocks/; this writes it into every script that lists it
# (the suite's tests/test_blocks.py runs the same generator with --check).
blocks:
	$(PYTHON) blocks/build.py

test: $(DEV_STAMP) $(LLAMA_SERVER)
	$(BIN)/python -m pytest -q

# The demo: tiny models trained for a few minutes on the bundled sample, so the
# figures show that every stage works, not what a real run reaches.
demo: demo-data demo-lstm demo-transformers demo-eval demo-chat

demo-data: $(STAMP)
	$(BIN)/python parser_dataset.py --input data/sample_dialogues.jsonl
	$(BIN)/python cleaner_text.py
	$(BIN)/python create_dataset.py

demo-lstm: $(STAMP)
	$(BIN)/python pytorch_chatbot.py train --epochs 5 --emb-dim 64 --hidden 128
	$(BIN)/python pytorch_chatbot.py eval
	$(BIN)/python tensorflow_chatbot.py train --epochs 5 --emb-dim 64 --hidden 128
	$(BIN)/python tensorflow_chatbot.py eval

demo-transformers: $(STAMP)
	$(BIN)/python train_transformer.py --from-scratch --n-layer 2 --n-embd 128 --max-steps 120 --eval-steps 40
	$(BIN)/python train_medium_context.py --from-scratch --n-layer 2 --n-embd 128 --max-steps 120 --eval-steps 40

demo-eval: $(STAMP)
	$(BIN)/python perplexity.py --model rugpt3_50k
	$(BIN)/python evaluate.py --model rugpt3_50k rugpt3_medium_CLEAN_model lstm_pytorch lstm_keras
	cat reports/comparison.md

demo-chat: $(STAMP)
	$(BIN)/python system_prompt.py --model rugpt3_medium_CLEAN_model --script data/demo_chat.txt

bench: $(STAMP)
	$(BIN)/python bench/data_stages.py
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf .pytest_cache reports lstm_pytorch lstm_keras rugpt3_50k rugpt3_medium_CLEAN_model \
	       data/*.parquet data/*.csv data/clean_report.json \
	       data/voice.json *.gguf *.chat_config.json
