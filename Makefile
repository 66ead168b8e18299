# The two commands of README.md: `make demo` and `make test`. Both create .venv on first use.
# TORCH pins the CPU wheel for this venv; on a GPU machine: `make demo TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

SAMPLE := work/sample

.PHONY: demo demo-text demo-bert demo-gpt2 demo-export shards test docker-test install lint bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(VENV)/bin/pytest -q --durations=25

# The images built with podman and docker/compose.yaml's local swarm run in containers (minutes; needs
# podman and mmdebstrap, no image registry: tests/test_docker_swarm.py). TORCH_WHEEL: a local torch
# wheel to build with offline (default: a CPU wheel in /opt/wheels, if there is one).
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-*+cpu-*.whl))
docker-test: install
	CONVMODEL_TORCH_WHEEL="$(TORCH_WHEEL)" $(VENV)/bin/pytest -q -s -m docker tests/test_docker_swarm.py

# the pins of docker/constraints.txt: this .venv's versions, less convmodel and torch (the images' TORCH)
docker/constraints.txt: $(VENV)/.installed
	{ sed -n '1,3p' $@; $(PY) -m pip freeze --exclude-editable | grep -viE '^(#|torch==)'; } > $@.new && mv $@.new $@

# The whole pipeline on a corpus built from text already on this machine (no downloads): a BERT
# and a GPT-2, each checked against the loss of a model that knows only token frequencies
# (show_metrics.py --min_below_baseline fails the demo if a model did not learn more than that).
# `demo` is its four parts in order; each later part reads what the earlier ones wrote (README's
# pipeline block is demo-text and demo-bert typed by hand, so tests/test_readme_commands.py runs
# that block, then `make demo-gpt2 demo-export`, rather than training BERT twice).
demo: install demo-text demo-bert demo-gpt2 demo-export

demo-text: install
	@echo "== 1/7 sample corpus (Python standard library docstrings) =="
	$(PY) data/make_sample_corpus.py --output_dir $(SAMPLE)/text
	@echo "== 2/7 tokenizer =="
	$(PY) trainer/train_tokenizer.py --input $(SAMPLE)/text/train.txt --output_dir $(SAMPLE)/tokenizer --vocab_size 4000

demo-bert: install
	@echo "== 3/7 JSONL shards: mlm (64 tokens) for BERT =="
	$(MAKE) --no-print-directory shards OBJECTIVE=mlm LENGTH=64
	@echo "== 4/7 pretrain bert-tiny (masked LM, a few minutes on 2 CPU cores) =="
	$(PY) trainer/trainer.py fit --config configs/bert-tiny.yaml --overwrite_checkpoints true
	$(PY) trainer/show_metrics.py --logdir runs/bert-tiny --tag val/loss --min_below_baseline 0.5

demo-gpt2: install
	@echo "== 5/7 JSONL shards: clm (128 tokens) for GPT-2; pretrain gpt2-tiny (causal LM, a few minutes) =="
	$(MAKE) --no-print-directory shards OBJECTIVE=clm LENGTH=128
	$(PY) trainer/trainer.py fit --config configs/gpt2-tiny.yaml --overwrite_checkpoints true
	$(PY) trainer/show_metrics.py --logdir runs/gpt2-tiny --tag val/loss --min_below_baseline 1.5

demo-export: install
	@echo "== 6/7 export both to Hugging Face folders =="
	for model in bert-tiny gpt2-tiny; do \
	  $(PY) trainer/export_model.py --ckpt_path runs/$$model/checkpoints/last.ckpt --output_dir runs/$$model/model \
	    --config configs/$$model.yaml --overwrite || exit 1; \
	done
	@echo "== 7/7 fill a mask with BERT, continue a prompt with GPT-2 =="
	$(PY) trainer/fill_mask.py --model_dir runs/bert-tiny/model --text "Return the [MASK] of the list."
	$(PY) trainer/generate.py --model_dir runs/gpt2-tiny/model --prompt "If the file does not exist,"

# the demo's shards of one objective, per split (README's step 3)
shards:
	for split in train valid test; do \
	  $(PY) trainer/prepare_train_data.py --input $(SAMPLE)/text/$$split.txt --tokenizer $(SAMPLE)/tokenizer \
	    --output_dir $(SAMPLE)/shards/$(OBJECTIVE)/$$split --objective $(OBJECTIVE) --max_seq_len $(LENGTH) \
	    --overwrite || exit 1; \
	done

bench: install
	$(PY) bench/lightning_vs_bare.py
	$(PY) bench/data_pipeline.py
	$(PY) bench/lean_albert_memory.py
	$(PY) bench/lightning_hivemind_step.py
	$(PY) bench/swarm_vs_local.py
	$(PY) bench/lamb8bit.py
	$(PY) bench/parity_bare_loop.py
	$(PY) bench/unseen_text.py

clean:
	rm -rf $(VENV) runs work
