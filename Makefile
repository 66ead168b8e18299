# The two commands of README.md: `make demo` and `make test`. Both create .venv on first use.
# TORCH pins the CPU wheel for this venv; on a GPU machine: `make demo TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python

SAMPLE := work/sample

.PHONY: demo test install lint bench clean

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
	$(VENV)/bin/pytest -q

# The whole pipeline on a corpus built from text already on this machine (no downloads).
demo: install
	@echo "== 1/6 sample corpus (Python standard library docstrings) =="
	$(PY) data/make_sample_corpus.py --output_dir $(SAMPLE)/text
	@echo "== 2/6 tokenizer =="
	$(PY) trainer/train_tokenizer.py --input $(SAMPLE)/text/train.txt --output_dir $(SAMPLE)/tokenizer --vocab_size 8000
	@echo "== 3/6 JSONL shards =="
	for split in train valid test; do \
	  $(PY) trainer/prepare_train_data.py --input $(SAMPLE)/text/$$split.txt --tokenizer $(SAMPLE)/tokenizer \
	    --output_dir $(SAMPLE)/shards/mlm/$$split --objective mlm --max_seq_len 128 --overwrite || exit 1; \
	done
	@echo "== 4/6 pretrain bert-tiny (a few minutes on 2 CPU cores) =="
	$(PY) trainer/trainer.py fit --config configs/bert-tiny.yaml
	@echo "== 5/6 result =="
	$(PY) trainer/show_metrics.py --logdir runs/bert-tiny --tag val/loss --min_drop 0.2
	@echo "== 6/6 export to a Hugging Face folder and fill a mask =="
	$(PY) trainer/export_model.py --ckpt_path runs/bert-tiny/checkpoints/last.ckpt --output_dir runs/bert-tiny/model \
	  --config configs/bert-tiny.yaml --overwrite
	$(PY) trainer/fill_mask.py --model_dir runs/bert-tiny/model --text "Return the [MASK] of the list."

bench: install
	$(PY) bench/lightning_vs_bare.py
	$(PY) bench/data_pipeline.py
	$(PY) bench/lean_albert_memory.py
	$(PY) bench/lightning_hivemind_step.py
	$(PY) bench/swarm_vs_local.py

clean:
	rm -rf $(VENV) runs work
