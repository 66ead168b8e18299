"""keep_heap_from_growing: a training-like loop whose tensor sizes change every step keeps its memory."""

import subprocess
import sys

import pytest

# Logits of a varying number of predicted tokens (as masked LM makes them), their backward, and
# small tensors that stay alive between steps (as logged metrics and optimizer state do): the
# pattern that made bert-tiny's resident memory grow by about 2 MB a step.
LOOP = """
import sys, torch
from convmodel.heap import keep_heap_from_growing
if sys.argv[1] == "fixed":
    assert keep_heap_from_growing()
torch.set_num_threads(1)
def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
generator = torch.Generator().manual_seed(0)
weight = torch.randn(128, 4000, requires_grad=True)
kept = []
for step in range(300):
    if step == 20:
        start = resident_mb()
    n = int(torch.randint(300, 700, (1,), generator=generator))
    hidden = torch.randn(n, 128, requires_grad=True)
    (hidden @ weight).log_softmax(-1).mean().backward()
    kept.append(torch.ones(int(torch.randint(10, 5000, (1,), generator=generator))))
print(resident_mb() - start)
"""


def growth_mb(variant: str) -> float:
    out = subprocess.run([sys.executable, "-c", LOOP, variant], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_varying_tensor_sizes_do_not_grow_the_heap():
    fixed, default = growth_mb("fixed"), growth_mb("default")
    # the kept tensors themselves are ~4 MB; with glibc's default the holes between them add ~150 MB
    assert fixed < 60, f"resident memory grew by {fixed:.0f} MB with the fix"
    assert default > fixed + 50, f"the loop no longer shows the problem (default {default:.0f} MB, fixed {fixed:.0f})"
