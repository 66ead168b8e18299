"""Every compression option really averages: two real hivemind averagers on 127.0.0.1.

hivemind 1.1.12 with NumPy 2.4 drops every 8-bit part from the other peer while reporting a
successful round; these tests compare the numbers each peer ends with, not the log.
"""

import contextlib

import pytest
import torch

hivemind = pytest.importorskip("hivemind")

from convmodel.collaborative.compression import (  # noqa: E402
    COMPRESSION_NAMES,
    SIZE_ADAPTIVE_THRESHOLD,
    build_compression,
)

LOOPBACK = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_ipfs=False, use_relay=False, use_auto_relay=False,
                nat_port_map=False, auto_nat=False)
ROUND_TIMEOUT = 60  # seconds; a round on loopback takes well under one


@contextlib.contextmanager
def two_dhts():
    first = hivemind.DHT(start=True, **LOOPBACK)
    second = None
    try:
        second = hivemind.DHT(initial_peers=[str(a) for a in first.get_visible_maddrs()], start=True, **LOOPBACK)
        yield first, second
    finally:
        for dht in (second, first):
            if dht is not None:
                dht.shutdown()


def peer_tensors(seed: int) -> list[torch.Tensor]:
    """A large matrix (8-bit under size-adaptive) and a small vector (fp16), different on each peer."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(SIZE_ADAPTIVE_THRESHOLD * 2, generator=generator) + seed,
            torch.randn(1000, generator=generator) - seed]


def average_once(compression, prefix: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One all-reduce round between two averagers; returns each peer's tensors afterwards."""
    results = []
    with two_dhts() as dhts:
        averagers = []
        try:
            for seed, dht in enumerate(dhts):
                averagers.append(hivemind.averaging.DecentralizedAverager(
                    averaged_tensors=peer_tensors(seed), dht=dht, prefix=prefix, target_group_size=2,
                    min_group_size=2, min_matchmaking_time=1.0, request_timeout=0.5, compression=compression,
                    start=True))
            controls = [a.step(wait=False, timeout=ROUND_TIMEOUT) for a in averagers]
            for control in controls:
                assert control.result(timeout=ROUND_TIMEOUT) is not None, "the averaging round failed"
            for averager in averagers:
                with averager.get_tensors() as tensors:
                    results.append([t.clone() for t in tensors])
        finally:
            for averager in averagers:
                averager.shutdown()
    return results[0], results[1]


# max abs error allowed per element, relative to the spread of the inputs (std ~1, means 0 and 1)
TOLERANCE = {"none": 1e-5, "fp16": 5e-3, "uint8": 0.15, "size-adaptive": 0.15}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("name", COMPRESSION_NAMES)
def test_each_compression_averages_every_part(name):
    first, second = average_once(build_compression(name, "grad_compression"), prefix=f"avg_{name.replace('-', '_')}")
    expected = [(a + b) / 2 for a, b in zip(peer_tensors(0), peer_tensors(1))]
    for got_first, got_second, want in zip(first, second, expected):
        # no part dropped: each element moved from the peer's own value to the mean
        # (the peers' inputs differ by ~1 on average, far beyond the compression error)
        assert (got_first - want).abs().mean() < TOLERANCE[name] / 3
        assert (got_second - want).abs().mean() < TOLERANCE[name] / 3
        assert torch.quantile((got_first - want).abs(), 0.99) < TOLERANCE[name]
        assert torch.quantile((got_first - got_second).abs(), 0.99) < 2 * TOLERANCE[name]


@pytest.mark.timeout(150)
def test_hivemind_own_uint8_codec_drops_the_other_peers_parts_on_numpy2():
    """The trap our codecs fix: with hivemind's table entry, each peer keeps (mostly) its own numbers."""
    import numpy as np
    from hivemind.compression import serialization
    from hivemind.compression.quantization import Uniform8BitQuantization

    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("the bug needs NumPy 2")
    table = serialization._BASE_COMPRESSION_TYPES
    ours = table["UNIFORM_8BIT"]
    table["UNIFORM_8BIT"] = Uniform8BitQuantization()
    try:
        first, _ = average_once(Uniform8BitQuantization(), prefix="avg_trap")
    finally:
        table["UNIFORM_8BIT"] = ours
    own, want = peer_tensors(0)[0], (peer_tensors(0)[0] + peer_tensors(1)[0]) / 2
    assert (first[0] - want).abs().mean() > 0.3  # not averaged...
    assert (first[0] - own).abs().mean() < 0.3   # ...it kept (about) its own half
