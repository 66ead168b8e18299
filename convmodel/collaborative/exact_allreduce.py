"""A hivemind averager after whose all-reduce every groupmate holds the same bytes, and that says when it did not.

hivemind's all-reduce returns deltas: the reducer of a part sends each sender `Q(average - part)`
and the sender adds it to its own part. Each peer then ends with its own rounding and compression
error (measured here: two peers' DiLoCo outer weights differed after the first round even with no
compression). DiLoCo's outer weights must stay identical without being re-averaged, so here the
reducer sends the (compressed) average itself, keeps the same decompressed copy for its own part,
and every peer overwrites its buffers with what it received.

hivemind also completes a round whose sender or reducer dropped out: the missing parts keep this
peer's own numbers (a WARN "received 50.0% ..." is all it says). Such rounds are counted in
`partial_rounds` (shared with the averager's process). A round that fails midway has already
written part of the result into the buffers and is retried from there: they are restored first.

Peers of this averager and of hivemind's own must never share a prefix: a classic peer would add
an average as if it were a delta.
"""

_AVERAGER_CLASS = None


def exact_averager_class():
    """The DecentralizedAverager subclass (built once, on first use: hivemind is imported then)."""
    global _AVERAGER_CLASS
    if _AVERAGER_CLASS is None:
        _AVERAGER_CLASS = _build_averager_class()
    return _AVERAGER_CLASS


def _build_runner_class():
    import asyncio

    from hivemind.averaging.allreduce import AllReduceRunner
    from hivemind.averaging.partition import BannedException
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
    from hivemind.proto import averaging_pb2
    from hivemind.utils import amap_in_executor

    class ExactAllReduceRunner(AllReduceRunner):
        """AllReduceRunner whose outputs are the averages themselves, as compressed on the wire, for every peer."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.tensor_part_container.return_deltas = False  # a failed reducer's parts: this peer's own

        async def _communicate_with_peer(self, peer_id):
            if peer_id != self.peer_id:
                return await super()._communicate_with_peer(peer_id)  # registers what that reducer sent
            container = self.tensor_part_container
            peer_index, sender_index = self.ordered_peer_ids.index(peer_id), self.sender_peer_ids.index(peer_id)
            infos = [info for _, info in container._input_parts_by_peer[peer_index]]  # cleared if the round ends early
            for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
                averaged = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, tensor_part, weight=self.weight)
                # the codec the other peers' parts travel in, chosen as for them: the same bytes they receive
                codec = container.compression.compress(tensor_part, infos[part_index]).compression
                container.register_processed_part(
                    peer_index, part_index, deserialize_torch_tensor(serialize_torch_tensor(averaged, codec)))

        async def _accumulate_parts_streaming(self, stream, sender_index: int):
            # hivemind's (allreduce.py, 1.1.12), sending the average instead of `average - part`
            part_index = 0
            try:
                loop = asyncio.get_event_loop()
                async for tensor_part, weight, codec in amap_in_executor(
                        lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight, msg.tensor_part.compression),
                        stream, max_prefetch=self.tensor_part_container.prefetch):
                    try:
                        averaged = await self.tensor_part_reducer.accumulate_part(
                            sender_index, part_index, tensor_part, weight=weight)
                        part_index += 1
                    except BannedException:
                        break  # that sender was banned: no longer aggregated
                    serialized = await loop.run_in_executor(None, serialize_torch_tensor, averaged, codec)
                    yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
            finally:
                if part_index != self.tensor_part_reducer.num_parts:
                    await self._ban_sender(self.sender_peer_ids[sender_index])

    return ExactAllReduceRunner


def _build_averager_class():
    import ctypes
    import multiprocessing as mp

    from hivemind.averaging import DecentralizedAverager
    from hivemind.averaging.allreduce import AveragingMode
    from hivemind.utils import get_dht_time
    from hivemind.utils.asyncio import as_aiter, azip

    runner_class = _build_runner_class()

    class ExactAverager(DecentralizedAverager):
        """DecentralizedAverager whose groupmates end each round with the same bytes; counts partial rounds."""

        def __init__(self, *args, start: bool, **kwargs):
            super().__init__(*args, start=False, **kwargs)
            self.partial_rounds = mp.Value(ctypes.c_int64, 0)  # before the process forks: shared with it
            #: () -> (metadata, tensors): the state a joiner downloads (in this process, from hivemind's thread)
            self.state_source = None
            if start:
                self.run_in_background(await_ready=True)

        def get_current_state(self):
            if self.state_source is None:
                return super().get_current_state()
            metadata, tensors = self.state_source()
            return metadata, tensors, None

        async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
            # hivemind's (averager.py, 1.1.12) with the exact runner, overwriting instead of adding
            group_id = group_info.group_id if group_id is None else group_id
            runner = runner_class(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, tensors=tensors,
                                  group_id=group_id, ordered_peer_ids=group_info.peer_ids, **kwargs)
            assert group_id in self._running_groups, f"Group id {group_id} was not registered"
            self._running_groups[group_id].set_result(runner)
            backup = [tensor.clone() for tensor in tensors]
            try:
                if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
                    async for tensor, averaged in azip(as_aiter(*tensors), runner):
                        tensor.copy_(averaged)
                        self.last_updated = get_dht_time()
                        self._state_updated.set()
                else:
                    async for _ in runner:
                        raise ValueError("aux peers should not receive averaged tensors")
            except BaseException:
                for tensor, saved in zip(tensors, backup, strict=True):
                    tensor.copy_(saved)
                raise
            if runner.tensor_part_container.failed_size or runner.banned_senders or any(
                    failed != float("inf") for failed in runner.tensor_part_reducer.sender_failed_after):
                with self.partial_rounds.get_lock():
                    self.partial_rounds.value += 1

    return ExactAverager
