"""Run an auxiliary peer: the swarm's monitor, checkpoint store and averaging helper (no GPU needed).

    python trainer/run_aux_peer.py --config configs/collaborative/bert-tiny.yaml [--store_checkpoints DIR] \
        [--checkpoint_every N] [--push_to_hub ORG/NAME --upload_every SECONDS] [--assist_in_averaging] \
        [--logdir DIR] [--trainer.strategy.init_args.initial_peers ...]

See convmodel/collaborative/aux_peer.py and `--help`.
"""

from convmodel.collaborative.aux_peer import main

if __name__ == "__main__":
    main()
