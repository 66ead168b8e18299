"""Training in a hivemind swarm: `trainer.strategy: convmodel.collaborative.HivemindStrategy`.

Importing this package registers the strategy as "hivemind" in Lightning's StrategyRegistry;
hivemind itself is imported only when a peer starts.
"""

from convmodel.collaborative.strategy import HivemindStrategy

__all__ = ["HivemindStrategy"]
