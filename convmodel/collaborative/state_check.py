"""A swarm state downloaded from a peer is checked against this peer's own tensors before any of it is applied.

hivemind's TrainingStateAverager copies the received tensors into the parameters and optimizer state
without looking at them: a peer of the same run_id with another model size makes every copy fail
after the optimizer state was already overwritten (hivemind.Optimizer then retries the download
forever, one traceback each time), and shapes that broadcast or a non-finite tensor pass silently.
Here the received tensors must match this peer's in number, shape and dtype, and be finite; a
state that does not is refused whole and nothing of it is applied. A joining trainer then stops
with one error naming the first tensor that differs (swarm_peer.catch_up); a trainer already
training and the auxiliary peer say so and keep their own state.
"""

import sys
from collections.abc import Sequence
from itertools import chain

_CHECKED_CLASS = None


def checked_state_averager_class():
    """hivemind's TrainingStateAverager with the check (built once, on first use: hivemind loads lazily)."""
    global _CHECKED_CLASS
    if _CHECKED_CLASS is None:
        from hivemind.averaging import DecentralizedAverager
        from hivemind.optim.state_averager import TrainingStateAverager

        class CheckedDownload(DecentralizedAverager):
            """Sits between TrainingStateAverager and DecentralizedAverager: what the download returns is
            checked before TrainingStateAverager applies it; a refused state is returned as no state."""

            state_mismatch: str | None = None
            tensor_names: Sequence[str] = ()
            schema: dict | None = None  # this peer's model_schema, sent with the state it serves

            def load_state_from_peers(self, **kwargs):
                loaded = super().load_state_from_peers(**kwargs)
                if loaded is None:
                    return None
                metadata, tensors = loaded
                served = metadata.get(SCHEMA_KEY) if isinstance(metadata, dict) else None
                self.state_mismatch = (schema_mismatch(self.schema, served) if self.schema and isinstance(served, dict)
                                       else None) or state_mismatch(own_state_tensors(self), tensors, self.tensor_names)
                if self.state_mismatch:
                    return None
                poisoned = first_non_finite(tensors, self.tensor_names)
                if poisoned:
                    print(f"[convmodel] refused the state a peer sent: its {poisoned} holds NaN or infinite "
                          "values; this peer keeps its own", file=sys.stderr, flush=True)
                    return None
                return loaded

        class CheckedTrainingStateAverager(TrainingStateAverager, CheckedDownload):
            """TrainingStateAverager whose downloads are checked (CheckedDownload runs under its own method) and
            whose served state carries its schema.

            Build it directly, not by changing an instance's class: hivemind's state-serving thread holds
            the get_current_state of the class the averager was built with.
            """

            def get_current_state(self):
                metadata, tensors, infos = super().get_current_state()
                if self.schema:
                    metadata = {**metadata, SCHEMA_KEY: {**self.schema, "peer": str(self.dht.peer_id)}}
                return metadata, tensors, infos

        # hivemind names its RPC protocols after the class ("<prefix>::TrainingStateAverager.rpc_download_state"):
        # under our own name, the trainers and this peer could not download from each other
        CheckedTrainingStateAverager.__name__ = CheckedTrainingStateAverager.__qualname__ = "TrainingStateAverager"
        _CHECKED_CLASS = CheckedTrainingStateAverager
    return _CHECKED_CLASS


SCHEMA_KEY = "convmodel_schema"  # in the metadata of a served state; hivemind's own keys are left as they are
#: config entries that change how a model runs, not what it is: peers may differ in them
RUNTIME_SETTINGS = frozenset({"use_cache", "return_dict", "output_attentions", "output_hidden_states", "torchscript",
                              "gradient_checkpointing", "transformers_version", "dtype", "torch_dtype",
                              "architectures", "problem_type", "tokenizer_class", "chunk_size_feed_forward"})
FIX = ("peers of one run_id must train one model with one optimizer config: check model.init_args "
       "(config, optimizer) against the swarm's, or give this run another trainer.strategy.init_args.run_id")


def model_schema(module, optimizer) -> dict:
    """What the peers of one run must share: the model config's whole-number, text and yes/no settings
    (sizes, counts, vocabulary, architecture switches) and the optimizer's class.

    Floats (dropout, eps, init ranges) are left out: peers may tune them without breaking the swarm.
    """
    config = getattr(getattr(module, "model", None), "config", None)
    settings = config.to_dict() if config is not None else {}
    schema = {key: value for key, value in sorted(settings.items())
              if not key.startswith("_") and key not in RUNTIME_SETTINGS and isinstance(value, bool | int | str)}
    schema["optimizer"] = type(optimizer).__name__
    return schema


def schema_mismatch(own: dict, served: dict) -> str | None:
    """The settings in which a served state's schema differs from this peer's (None when none does)."""
    differing = [key for key in own if key != "peer" and key in served and served[key] != own[key]]
    if not differing:
        return None
    theirs = ", ".join(f"{key} {served[key]}" for key in differing)
    ours = ", ".join(f"{key} {own[key]}" for key in differing)
    return f"peer {served.get('peer', '(unnamed)')} serves {theirs}; this config has {ours}; {FIX}"


def own_state_tensors(averager) -> list:
    """This peer's tensors in the order a peer sends them: parameters, extra tensors, optimizer state."""
    from hivemind.optim.state_averager import dump_optimizer_state

    parameters = [p for group in averager.optimizer.param_groups for p in group["params"]]
    return [*chain(parameters, averager.extra_tensors), *dump_optimizer_state(averager.optimizer)[1]]


def state_mismatch(own: Sequence, received: Sequence, names: Sequence[str] = ()) -> str | None:
    """What makes `received` unfit to replace `own` (None when it fits), naming the first tensor that differs."""
    if len(received) != len(own):
        return (f"the swarm's state has {len(received)} tensors, this peer's model and optimizer {len(own)}; {FIX}")
    for index, (mine, theirs) in enumerate(zip(own, received)):
        if tuple(theirs.shape) != tuple(mine.shape) or theirs.dtype != mine.dtype:
            return (f"the swarm's {tensor_name(index, names)} is {list(theirs.shape)} "
                    f"{str(theirs.dtype).removeprefix('torch.')}, this peer's {list(mine.shape)} "
                    f"{str(mine.dtype).removeprefix('torch.')}; {FIX}")
    return None


def first_non_finite(received: Sequence, names: Sequence[str] = ()) -> str | None:
    """The name of the first floating-point tensor with a NaN or an infinity, None when all are finite."""
    import torch

    for index, tensor in enumerate(received):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return tensor_name(index, names)
    return None


def tensor_name(index: int, names: Sequence[str]) -> str:
    return names[index] if index < len(names) else f"tensor {index} of the state"


def describe_state(averager, module, optimizer) -> None:
    """Give a checked averager what its checks name and send: the module's parameter names and schema."""
    averager.tensor_names = parameter_names(module, optimizer)
    averager.schema = model_schema(module, optimizer)


def parameter_names(module, optimizer) -> list[str]:
    """The module's names of the optimizer's parameters, in the order a swarm state sends them."""
    by_id = {id(p): name for name, p in module.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [by_id.get(id(p), f"parameter {index}") for index, p in enumerate(params)]
