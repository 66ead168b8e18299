"""Training in a hivemind swarm: `trainer.strategy: convmodel.collaborative.HivemindStrategy`.

A config names the strategy by class_path, which imports this package; importing it also
registers the strategy as "hivemind" in Lightning's StrategyRegistry (for code that builds a
Trainer itself). hivemind itself is imported only when a peer starts.
"""

from convmodel.collaborative.strategy import HivemindStrategy

__all__ = ["HivemindStrategy"]
