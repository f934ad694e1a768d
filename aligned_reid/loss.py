"""Distances and losses of AlignedReID (Zhang et al., arXiv 1711.08184): pairwise and
shortest-path local distances, batch-hard mining, triplet / ID / mutual-learning losses."""
import torch
import torch.nn.functional as F

# The distances live in aligned_reid.distance; the public names stay importable from here.
from .distance import (batch_local_dist, euclidean_dist, local_dist, normalize,  # noqa: F401
                       shortest_path)


def hard_example_mining(dist, labels, check=True):
    """Batch-hard mining (Hermans et al., "In Defense of the Triplet Loss").

    dist [N, N] pairwise distances, labels [N] identities. For each anchor i returns the
    farthest positive (same label, j != i) and the nearest negative (other label):
    dist_ap [N], dist_an [N] (differentiable w.r.t. dist) and their column indices
    p_inds [N], n_inds [N]. Works for any number of images per identity. With `check`, raises
    ValueError when an anchor has no positive or no negative in the batch; the check reads the
    masks back to the host, so a training loop whose sampler guarantees P >= 2 identities of
    K >= 2 images passes check=False and stays free of device-to-host synchronisation."""
    N = dist.size(0)
    if dist.shape != (N, N) or labels.shape != (N,):
        raise ValueError(f"hard_example_mining expects dist [N, N] and labels [N], got "
                         f"{tuple(dist.shape)} and {tuple(labels.shape)}")
    same = labels[:, None] == labels[None, :]                              # [N, N]
    is_pos = same & ~torch.eye(N, dtype=torch.bool, device=dist.device)
    is_neg = ~same
    for mask, kind in ((is_pos, "positive (another image of its identity)"),
                       (is_neg, "negative (an image of another identity)")):
        if not check:
            break
        lonely = (~mask.any(1)).nonzero().flatten()
        if len(lonely):
            raise ValueError(f"hard_example_mining: anchor(s) {lonely[:10].tolist()} (labels "
                             f"{labels[lonely[:10]].tolist()}) have no {kind} in the batch; "
                             f"sample at least 2 images of at least 2 identities per batch")
    inf = torch.finfo(dist.dtype).max
    dist_ap, p_inds = dist.masked_fill(~is_pos, -inf).max(1)
    dist_an, n_inds = dist.masked_fill(~is_neg, inf).min(1)
    return dist_ap, dist_an, p_inds, n_inds


def triplet_loss(dist_ap, dist_an, margin=0.3):
    """Triplet loss on mined distances dist_ap [N], dist_an [N] -> scalar: the mean of
    max(0, d_ap - d_an + margin), or of the soft margin log(1 + exp(d_ap - d_an)) when
    margin is None."""
    if margin is None:
        return F.softplus(dist_ap - dist_an).mean()
    return F.relu(dist_ap - dist_an + margin).mean()


def _triplet_stats(prefix, dist_ap, dist_an, margin):
    """Statistics logged by the original project, as detached 0-d tensors on the features'
    device (read only when logged): precision (d_an > d_ap), margin satisfaction
    (d_an > d_ap + margin; margin 0 for the soft margin), mean d_ap, d_an."""
    dist_ap, dist_an = dist_ap.detach(), dist_an.detach()
    return {f"{prefix}_prec": (dist_an > dist_ap).float().mean(),
            f"{prefix}_sm": (dist_an > dist_ap + (margin or 0.)).float().mean(),
            f"{prefix}_dist_ap": dist_ap.mean(),
            f"{prefix}_dist_an": dist_an.mean()}


def _at_least_float32(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _select_rows(x, index):
    """x[index] for x [N, ...] and index [M] -> [M, ...], through F.embedding, whose backward
    sums the gradients of a repeated row in a fixed order: on a CPU each thread owns a range of
    rows and adds their gradients in index order; on CUDA the indices are sorted first.

    Plain indexing accumulates them with index_put_(accumulate=True), which on a CPU uses
    parallel atomic float adds once the gradient has 32768 elements and torch more than one
    thread (the demo batch, 128 mined rows of 2 x 128, is exactly that size): the rounding of
    the sums, and so a whole training run, then changed with thread timing. The values are the
    same rows, copied."""
    return F.embedding(index, x.reshape(x.size(0), -1)).view(index.size(0), *x.shape[1:])


def compute_losses(outputs, labels, global_margin=0.3, local_margin=0.3, global_loss_weight=1.,
                   local_loss_weight=0., id_loss_weight=0., normalize_feature=False,
                   local_dist_own_hard_sample=False, label_smoothing=0., check_batch=True):
    """The AlignedReID training objective for one batch.

    outputs: dict from `Model.forward` ('global' [N, C], 'local' [N, h, c], 'logits' [N, K]);
    labels [N]. Margins of None use the soft margin. normalize_feature L2-normalises the
    global feature per vector and the local feature per stripe. The local triplet loss uses
    the pairs mined on the global distance unless local_dist_own_hard_sample, in which case it
    mines on the full local distance matrix. The ID loss is cross-entropy with optional
    label smoothing. Half-precision features and logits are upcast to float32 (call this
    outside torch.autocast, which would cast the distance matmuls down again).

    check_batch: check that every anchor has a positive and a negative (a device-to-host read;
    see `hard_example_mining`).

    Returns a dict: 'loss' (weighted total, tensor), 'global_loss' with the global_* statistics
    (always), 'local_loss' with local_* statistics when local_loss_weight > 0, 'id_loss' and
    'id_prec' when id_loss_weight > 0. Statistics are detached 0-d tensors: computing them
    never waits for the device."""
    g = _at_least_float32(outputs["global"])
    if normalize_feature:
        g = normalize(g, dim=-1)
    g_dist = euclidean_dist(g, g)                                        # [N, N]
    dist_ap, dist_an, p_inds, n_inds = hard_example_mining(g_dist, labels, check=check_batch)
    terms = {"global_loss": triplet_loss(dist_ap, dist_an, global_margin)}
    terms.update(_triplet_stats("global", dist_ap, dist_an, global_margin))
    total = global_loss_weight * terms["global_loss"]

    if local_loss_weight > 0:
        lf = _at_least_float32(outputs["local"])
        if normalize_feature:
            lf = normalize(lf, dim=-1)
        if local_dist_own_hard_sample:
            l_ap, l_an, _, _ = hard_example_mining(local_dist(lf, lf), labels, check=check_batch)
        else:   # positives and negatives in one call: half the kernels of two
            l_ap, l_an = batch_local_dist(lf.repeat(2, 1, 1),
                                          _select_rows(lf, torch.cat([p_inds, n_inds]))).chunk(2)
        terms["local_loss"] = triplet_loss(l_ap, l_an, local_margin)
        terms.update(_triplet_stats("local", l_ap, l_an, local_margin))
        total = total + local_loss_weight * terms["local_loss"]

    if id_loss_weight > 0:
        if outputs.get("logits") is None:
            raise ValueError("compute_losses: id_loss_weight > 0 needs outputs['logits']; build "
                             "the Model with num_classes set")
        logits = _at_least_float32(outputs["logits"])
        terms["id_loss"] = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        terms["id_prec"] = (logits.detach().argmax(1) == labels).float().mean()
        total = total + id_loss_weight * terms["id_loss"]

    terms["loss"] = total
    return terms


def mutual_losses(outputs, partner_outputs, labels, prob_weight=0., global_dist_weight=0.,
                  local_dist_weight=0., normalize_feature=False):
    """Mutual-learning losses (Zhang et al., "Deep Mutual Learning"; AlignedReID section 3.3)
    of one model against a partner whose outputs are treated as constants (detached).

    outputs, partner_outputs: dicts from `Model.forward` on the same batch; labels [N] (only
    checked against the batch size). Terms, each computed when its weight > 0:
    'prob_mutual_loss' = KL(p_partner || p) of the classifier probabilities (batch mean);
    'global_dist_mutual_loss' / 'local_dist_mutual_loss' = mean squared difference of the
    N x N global / local distance matrices. Returns {'loss': weighted total, **terms}."""
    N = outputs["global"].size(0)
    if labels.shape != (N,) or partner_outputs["global"].size(0) != N:
        raise ValueError("mutual_losses: outputs, partner_outputs and labels must describe the "
                         "same batch")
    terms = {}
    total = outputs["global"].new_zeros(())
    if prob_weight > 0:
        if outputs.get("logits") is None or partner_outputs.get("logits") is None:
            raise ValueError("mutual_losses: prob_weight > 0 needs 'logits' from both models")
        log_p = F.log_softmax(_at_least_float32(outputs["logits"]), dim=1)
        q = F.softmax(_at_least_float32(partner_outputs["logits"].detach()), dim=1)
        terms["prob_mutual_loss"] = F.kl_div(log_p, q, reduction="batchmean")
        total = total + prob_weight * terms["prob_mutual_loss"]
    for kind, weight in (("global", global_dist_weight), ("local", local_dist_weight)):
        if weight <= 0:
            continue
        f = _at_least_float32(outputs[kind])
        pf = _at_least_float32(partner_outputs[kind].detach())
        if normalize_feature:
            f, pf = normalize(f, dim=-1), normalize(pf, dim=-1)
        dist_fn = euclidean_dist if kind == "global" else local_dist
        terms[f"{kind}_dist_mutual_loss"] = (dist_fn(f, f) - dist_fn(pf, pf)).pow(2).mean()
        total = total + weight * terms[f"{kind}_dist_mutual_loss"]
    terms["loss"] = total
    return terms


def local_mutual_problem(local_dist_weight, local_dist_own_hard_sample):
    """The rule of the local-distance mutual loss: it needs local_dist_own_hard_sample, as in the older
    reproduction, whose code computes the term only then (its full local distance matrix exists only when
    the local triplets are mined on it) and otherwise leaves it at 0 whatever its weight. Rather than apply
    or drop a weight silently where the two codes differ, the combination is refused. Returns the one-line
    reason, or None when the combination is fine."""
    if local_dist_weight > 0 and not local_dist_own_hard_sample:
        return ("-ldmlw {:g} needs --local_dist_own_hard_sample true, as in the older reproduction, which "
                "computes the local-distance mutual loss only then (0 otherwise); give "
                "--local_dist_own_hard_sample true, or -ldmlw 0".format(local_dist_weight))
    return None


def mutual_learning_losses(outputs, labels, losses, mutual, compute=compute_losses):
    """The losses of two models trained together (AlignedReID section 3.3) on one batch. Model i minimises
    its own AlignedReID terms, compute(outputs[i], labels, **losses), plus its mutual losses against the
    other model (mutual_losses(outputs[i], outputs[1 - i], labels, **mutual), the partner detached).
    A local-distance mutual weight without losses['local_dist_own_hard_sample'] is refused
    (local_mutual_problem). Returns one dict per model: the own and mutual terms, 'own_loss', 'mutual_loss'
    and 'loss' (their sum)."""
    if len(outputs) != 2:
        raise ValueError("mutual_learning_losses: two models' outputs expected, got {}".format(len(outputs)))
    problem = local_mutual_problem(mutual.get("local_dist_weight", 0.), losses.get("local_dist_own_hard_sample", False))
    if problem:
        raise ValueError("mutual_learning_losses: " + problem)
    results = []
    for i, out in enumerate(outputs):
        own = compute(out, labels, **losses)
        ml = mutual_losses(out, outputs[1 - i], labels, normalize_feature=losses.get("normalize_feature", False),
                           **mutual)
        terms = dict(own, **{k: v for k, v in ml.items() if k != "loss"})
        terms["own_loss"], terms["mutual_loss"], terms["loss"] = own["loss"], ml["loss"], own["loss"] + ml["loss"]
        results.append(terms)
    return results
