"""CPU tests: `compute_losses` (global, local and ID terms, forward and backward) gives bitwise the
same loss and gradients every time on the same inputs and thread count, however busy the CPU is,
and its local term equals the plain formula (features gathered with `x[index]`) written here.

Run as a script (`python test_loss_repeatable.py ITERATIONS THREADS`), this file is the worker
of the contention test: it prints, as JSON, the SHA-256 digests seen for the loss and for each
gradient over ITERATIONS forward + backward passes."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import aligned_reid
from aligned_reid.loss import (batch_local_dist, compute_losses, euclidean_dist,
                               hard_example_mining, triplet_loss)

# The batch of `make demo`: 16 identities x 4 images, 2 stripes of 128 channels (ResNet-18 at
# 64 x 32), with the global, local and ID losses all on (-glw 1 -llw 1 -idlw 1).
P, K, STRIPES, CHANNELS, GLOBAL, CLASSES = 16, 4, 2, 128, 512, 40
WEIGHTS = dict(global_loss_weight=1., local_loss_weight=1., id_loss_weight=1.)

# Each worker: 2 torch threads, 30 passes (about a second alone). Two workers at once on a
# machine with few cores interleave their threads; the former x[index] gather, whose backward
# added the gradients of repeated rows with parallel atomic adds, gave 3 to 9 different
# local-feature gradients per worker at these settings on two shared cores.
WORKERS, ITERATIONS, THREADS = 2, 30, 2


def make_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    N = P * K
    outputs = {"global": torch.randn(N, GLOBAL, generator=gen),
               "local": torch.randn(N, STRIPES, CHANNELS, generator=gen),
               "logits": torch.randn(N, CLASSES, generator=gen)}
    return outputs, torch.arange(P).repeat_interleave(K)


def loss_and_grads(loss_fn, outputs, labels):
    """loss_fn(outputs, labels) -> scalar, on fresh leaves; returns (loss, {name: gradient})."""
    leaves = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    loss = loss_fn(leaves, labels)
    loss.backward()
    return loss.detach(), {k: v.grad for k, v in leaves.items()}


def plain_losses(outputs, labels):
    """The objective of `compute_losses` with WEIGHTS, its local term on the mined pairs gathered
    with plain advanced indexing (the formulation it replaced)."""
    g, lf = outputs["global"], outputs["local"]
    dist_ap, dist_an, p_inds, n_inds = hard_example_mining(euclidean_dist(g, g), labels)
    l_ap = batch_local_dist(lf, lf[p_inds])
    l_an = batch_local_dist(lf, lf[n_inds])
    return (triplet_loss(dist_ap, dist_an, 0.3) + triplet_loss(l_ap, l_an, 0.3)
            + F.cross_entropy(outputs["logits"], labels))


def digests(iterations, threads):
    """{'loss' / 'global' / 'local' / 'logits': sorted SHA-256 digests seen over `iterations`
    forward + backward passes of compute_losses on make_inputs()}."""
    torch.set_num_threads(threads)
    outputs, labels = make_inputs()
    seen = {}
    for _ in range(iterations):
        loss, grads = loss_and_grads(lambda o, y: compute_losses(o, y, **WEIGHTS)["loss"],
                                     outputs, labels)
        for name, t in [("loss", loss)] + sorted(grads.items()):
            seen.setdefault(name, set()).add(hashlib.sha256(t.numpy().tobytes()).hexdigest())
    return {name: sorted(d) for name, d in seen.items()}


def test_repeatable_bitwise_under_contention():
    """Workers started together on the same inputs: every pass of every worker gives the same
    bits (one digest per tensor in a worker, the same digests across workers)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(aligned_reid.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(ITERATIONS),
                               str(THREADS)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(WORKERS)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        results.append(json.loads(out))
    for w, result in enumerate(results):
        varied = {name: len(d) for name, d in result.items() if len(d) > 1}
        assert not varied, (f"worker {w}: number of different results in {ITERATIONS} identical "
                            f"passes: {varied}")
    assert all(r == results[0] for r in results[1:]), "the workers' results differ"


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("seed", [0, 1])
def test_local_loss_equals_plain_gather(seed):
    """Same loss (bitwise: the gathered features are exact) and the same gradients within float
    rounding (only the order of the sums over repeated rows may differ) as plain indexing."""
    outputs, labels = make_inputs(seed)
    loss, grads = loss_and_grads(lambda o, y: compute_losses(o, y, **WEIGHTS)["loss"],
                                 outputs, labels)
    ref_loss, ref_grads = loss_and_grads(plain_losses, outputs, labels)
    assert torch.equal(loss, ref_loss)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


if __name__ == "__main__":
    print(json.dumps(digests(int(sys.argv[1]), int(sys.argv[2]))))
