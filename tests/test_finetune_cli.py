"""trainer/finetune.py end to end: each task trains a few steps on tiny real models through the CLI.

One run per task: NER from a BERT folder (early stopping ends it), sentence-pair classification
from a GPT-2 pretraining .ckpt, pair regression from a BERT pretraining .ckpt. Each checks the scores it
reports against the exported model's own predictions; the last test runs every exported folder
in `transformers.pipeline` in one process where convmodel cannot be imported.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from finetune_helpers import (
    model_folder,
    tagged_sentences,
    text_examples,
    write_conll,
    write_csv,
    write_jsonl,
)

from convmodel.finetune.cli import main

REPO = Path(__file__).resolve().parents[1]
#: folder -> pipeline task, filled by the tests that export and run by the last test of this file
EXPORTED: dict[str, str] = {}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.log_every_n_steps", "1", "--data.batch_size", "16", "--model.lr", "3e-3",
         "--model.warmup_ratio", "0"]


def finetune(config: str, source: str, run_dir: Path, *args: str) -> dict:
    """One CLI run; its scores.json."""
    main(["--config", str(REPO / "configs" / "finetune" / config), "--model.source", source,
          "--trainer.logger.init_args.save_dir", str(run_dir), *QUIET, *args])
    (scores,) = run_dir.glob("version_*/scores.json")
    return json.loads(scores.read_text())


def pretrain_one_step(root: Path, corpus: str, tokenizer_dir: str, family: str) -> str:
    """A convmodel pretraining checkpoint (BERT or LeanALBERT mlm, GPT-2 clm) trained one step."""
    import pytorch_lightning as pl
    from finetune_helpers import TINY_BERT, TINY_GPT2, TINY_LEAN_ALBERT

    from convmodel.data import JsonlDataModule, prepare_train_data
    from convmodel.models import BertPretraining, Gpt2Pretraining, LeanAlbertPretraining

    objective = "clm" if family == "gpt2" else "mlm"
    shards = root / f"shards-{objective}"
    prepare_train_data(corpus, tokenizer_dir, str(shards), objective=objective, max_seq_len=64, num_workers=1,
                       progress=False)
    data = JsonlDataModule(tokenizer_dir, train_files=str(shards / "part-*.jsonl"), objective=objective,
                           batch_size=4, max_seq_len=64)
    module_class, config = {"bert": (BertPretraining, TINY_BERT), "gpt2": (Gpt2Pretraining, TINY_GPT2),
                            "lean_albert": (LeanAlbertPretraining, TINY_LEAN_ALBERT)}[family]
    module = module_class(tokenizer_dir, config=config, objective=objective, warmup_steps=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, data)
    trainer.save_checkpoint(root / f"{family}.ckpt")
    return str(root / f"{family}.ckpt")


@pytest.fixture(scope="module")
def bert_ckpt(tmp_path_factory, text_corpus, tokenizer_dir) -> str:
    return pretrain_one_step(tmp_path_factory.mktemp("pretrained"), text_corpus["valid"], tokenizer_dir, "bert")


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory, text_corpus, tokenizer_dir) -> str:
    return pretrain_one_step(tmp_path_factory.mktemp("pretrained"), text_corpus["valid"], tokenizer_dir, "gpt2")


def test_ner_stops_early_and_reports_the_exported_models_scores(tmp_path, tokenizer_dir):
    source = model_folder(tokenizer_dir, tmp_path / "bert")
    train = write_conll(tmp_path / "train.conll", tagged_sentences(48, 0))
    dev = write_conll(tmp_path / "dev.conll", tagged_sentences(16, 1))
    result = finetune("ner.yaml", source, tmp_path / "runs", "--data.train_file", str(train),
                      "--data.val_file", str(dev), "--data.test_file", str(dev), "--trainer.max_epochs", "8",
                      # no dev F1 gain of 1.0 is possible: stops after the first evaluation and `patience` more
                      "--early_stopping.patience", "1", "--early_stopping.min_delta", "1.0")
    assert result["global_step"] == 2 * 3  # 2 epochs of 48/16 batches, not 8
    dev_scores = result["scores"]["dev"]
    assert {"f1", "precision", "recall", "accuracy", "f1_PER", "f1_LOC"} <= set(dev_scores)
    assert result["scores"]["test"]["f1"] == pytest.approx(dev_scores["f1"])  # same file

    # the exported model's own predictions on dev give the reported dev F1 (the exported model is the best one)
    from transformers import AutoModelForTokenClassification

    from convmodel.finetune.datamodule import FinetuneDataModule
    from convmodel.finetune.metrics import entity_scores
    from convmodel.finetune.module import word_tags

    export = result["export_dir"]
    model = AutoModelForTokenClassification.from_pretrained(export).eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    data = FinetuneDataModule("token_classification", str(train), str(dev), source=export, batch_size=16)
    data.setup()
    assert data.labels == labels
    gold, predicted = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for row in range(logits.shape[0]):
                g, p = word_tags(logits[row].argmax(-1), batch["word_index"][row], batch["word_labels"][row], labels)
                gold.append(g)
                predicted.append(p)
    assert entity_scores(gold, predicted)["f1"] == pytest.approx(dev_scores["f1"])
    assert entity_scores(gold, predicted)["accuracy"] == pytest.approx(dev_scores["accuracy"])
    card = (Path(export) / "README.md").read_text()
    assert "pipeline_tag: token-classification" in card and f"| f1 | {dev_scores['f1']:.4f} |" in card
    EXPORTED[export] = "token-classification"


def test_pair_classification_from_a_gpt2_checkpoint(tmp_path, gpt2_ckpt):
    source = gpt2_ckpt
    header = ["premise", "hypothesis", "y"]
    train = write_csv(tmp_path / "train.csv", [e[:3] for e in text_examples(48, 0)], header)
    dev = write_jsonl(tmp_path / "dev.jsonl", [dict(zip(header, e[:3])) for e in text_examples(16, 1)])
    result = finetune("classification.yaml", source, tmp_path / "runs", "--data.train_file", str(train),
                      "--data.val_file", str(dev), "--data.test_file", "null", "--trainer.max_epochs", "2",
                      "--data.format", "auto", "--data.text_column", "premise", "--data.text_pair_column",
                      "hypothesis", "--data.label_column", "y", "--model.metric", "macro_f1")
    assert set(result["scores"]) == {"dev"} and result["global_step"] == 2 * 3
    assert {"accuracy", "macro_f1", "mcc"} <= set(result["scores"]["dev"])

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    export = result["export_dir"]
    config = json.loads((Path(export) / "config.json").read_text())
    assert config["id2label"] == {"0": "none", "1": "person", "2": "place"} and config["pad_token_id"] is not None
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    examples = text_examples(16, 1)
    with torch.no_grad():
        encoded = tokenizer([e[0] for e in examples], [e[1] for e in examples], padding=True, return_tensors="pt")
        predicted = model(**encoded).logits.argmax(-1).tolist()
    accuracy = sum(model.config.id2label[p] == e[2] for p, e in zip(predicted, examples)) / len(examples)
    assert accuracy == pytest.approx(result["scores"]["dev"]["accuracy"])
    EXPORTED[export] = "text-classification"


def test_pair_regression_from_a_pretraining_checkpoint(tmp_path, bert_ckpt):
    rows = [(t, p, s) for t, p, _, s in text_examples(48, 0)]
    dev_rows = [(t, p, s) for t, p, _, s in text_examples(16, 1)]
    train = write_csv(tmp_path / "train.tsv", rows, None, delimiter="\t")
    dev = write_csv(tmp_path / "dev.tsv", dev_rows, None, delimiter="\t")
    result = finetune("regression.yaml", bert_ckpt, tmp_path / "runs", "--data.train_file", str(train),
                      "--data.val_file", str(dev), "--data.test_file", str(dev), "--trainer.max_epochs", "2",
                      "--data.header", "false", "--data.text_column", "0", "--data.text_pair_column", "1",
                      "--data.label_column", "2")
    dev_scores = result["scores"]["dev"]

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    export = result["export_dir"]
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    tokenizer = AutoTokenizer.from_pretrained(export)
    with torch.no_grad():
        encoded = tokenizer([r[0] for r in dev_rows], [r[1] for r in dev_rows], padding=True, return_tensors="pt")
        predicted = model(**encoded).logits.squeeze(-1).double()
    gold = torch.tensor([r[2] for r in dev_rows], dtype=torch.float64)
    pearson = torch.corrcoef(torch.stack([predicted, gold]))[0, 1].item()
    # Spearman: Pearson of the ranks, tied values (equal similarities) sharing their mean rank
    ranks = [(x[None, :] < x[:, None]).sum(1) + ((x[None, :] == x[:, None]).sum(1) + 1) / 2 for x in (predicted, gold)]
    ranks = [r.double() for r in ranks]
    spearman = torch.corrcoef(torch.stack(ranks))[0, 1].item()
    assert dev_scores["pearson"] == pytest.approx(pearson, abs=1e-4)
    assert dev_scores["spearman"] == pytest.approx(spearman, abs=1e-4)
    assert result["scores"]["test"]["pearson"] == pytest.approx(pearson, abs=1e-4)
    EXPORTED[export] = "text-classification"


def test_ner_on_lean_albert_ships_its_token_classification_code(tmp_path, text_corpus, tokenizer_dir):
    source = pretrain_one_step(tmp_path, text_corpus["valid"], tokenizer_dir, "lean_albert")
    train = write_jsonl(tmp_path / "train.jsonl", [{"tokens": t, "tags": g} for t, g in tagged_sentences(32, 0)])
    result = finetune("ner.yaml", source, tmp_path / "runs", "--data.train_file", str(train),
                      "--data.val_file", str(train), "--data.test_file", "null", "--trainer.max_epochs", "1",
                      "--data.label_all_subtokens", "true")
    export = Path(result["export_dir"])
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["LeanAlbertForTokenClassification"]
    assert (export / "modeling_lean_albert.py").is_file()
    assert set(config["id2label"].values()) == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC"}  # I-LOC: sub-tokens
    EXPORTED[str(export)] = "token-classification"


def test_random_init_keeps_the_architecture_and_draws_new_weights(tmp_path, tokenizer_dir):
    from convmodel.finetune.module import build_task_model

    source = model_folder(tokenizer_dir, tmp_path / "bert")
    labels = ["O", "B-PER", "I-PER"]
    pretrained = build_task_model(source, "token_classification", labels, None)
    torch.manual_seed(1)  # model_folder drew the source's weights under seed 0
    random = build_task_model(source, "token_classification", labels, None, random_init=True)
    assert random.config.to_dict() == pretrained.config.to_dict()
    assert random.config.id2label == dict(enumerate(labels))
    assert [n for n, _ in random.named_parameters()] == [n for n, _ in pretrained.named_parameters()]
    assert not torch.equal(random.get_input_embeddings().weight, pretrained.get_input_embeddings().weight)
    assert random.training  # Lightning keeps the mode a module comes in


def test_num_seeds_runs_each_seed_and_tables_mean_and_std(tmp_path, tokenizer_dir):
    source = model_folder(tokenizer_dir, tmp_path / "bert")
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": c} for t, _, c, _ in text_examples(32, 0)])
    main(["--config", str(REPO / "configs" / "finetune" / "classification.yaml"), "--model.source", source,
          "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), *QUIET, "--data.train_file", str(train),
          "--data.val_file", str(train), "--data.test_file", "null", "--trainer.max_epochs", "1",
          "--num_seeds", "2", "--seed_everything", "7"])
    runs = [json.loads((tmp_path / "runs" / f"version_{i}" / "scores.json").read_text()) for i in (0, 1)]
    summary = json.loads((tmp_path / "runs" / "seeds.json").read_text())
    assert summary["seeds"] == [7, 8]
    table = (tmp_path / "runs" / "seeds.md").read_text()
    for metric in ("loss", "accuracy", "macro_f1", "mcc"):
        a, b = (run["scores"]["dev"][metric] for run in runs)
        assert summary["summary"]["dev"][metric]["mean"] == pytest.approx((a + b) / 2)
        # the sample std of two values is |a - b| / sqrt 2
        assert summary["summary"]["dev"][metric]["std"] == pytest.approx(abs(a - b) / 2 ** 0.5)
        assert f"| {metric} | {(a + b) / 2:.4f} ± {abs(a - b) / 2 ** 0.5:.4f} |" in table
    assert runs[0]["scores"]["dev"]["loss"] != runs[1]["scores"]["dev"]["loss"]  # the seeds did differ
    assert all(Path(run["export_dir"], "config.json").is_file() for run in runs)


def test_exported_folders_work_in_pipelines_without_convmodel():
    """The folders the tests above exported, each in `transformers.pipeline(task)`, all in one fresh process.

    One process for all of them: starting Python with torch and transformers costs ~6 s of CPU.
    Importing convmodel fails there; trust_remote_code only for a folder that ships its code (LeanALBERT).
    """
    if not EXPORTED:
        pytest.skip("no test above exported a folder in this run")
    runs = [(task, folder, "auto_map" in json.loads((Path(folder) / "config.json").read_text()))
            for folder, task in EXPORTED.items()]
    script = f"""
import sys
class NoConvmodel:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "convmodel":
            raise ImportError("convmodel is not installed here")
sys.meta_path.insert(0, NoConvmodel())
from transformers import pipeline
for task, folder, remote in {runs!r}:
    out = pipeline(task, model=folder, trust_remote_code=remote)("Alice Bob lived in Paris")
    print(folder, sorted({{item["entity" if task == "token-classification" else "label"] for item in out}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert done.returncode == 0, done.stderr[-3000:]
    printed = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith("/"))
    for folder in EXPORTED:
        labels = json.loads((Path(folder) / "config.json").read_text())["id2label"].values()
        assert set(eval(printed[folder])) <= set(labels), (folder, printed[folder])
