"""Distances and losses of AlignedReID (Zhang et al., arXiv 1711.08184): pairwise and
shortest-path local distances, batch-hard mining, triplet / ID / mutual-learning losses."""
import torch
import torch.nn.functional as F

# Default grid cells (pairs x m x n) per block of `local_dist`: 32 MB of float32, the one
# large buffer a block needs (the map and, without autograd, the path sweep reuse the matmul
# output). Large enough that per-operation overheads vanish even on a crowded CPU.
_BLOCK_ELEMENTS = 1 << 23


def normalize(x, dim=-1, eps=1e-12):
    """L2-normalise `x` along `dim` (any shape). Zero vectors stay zero."""
    return x / x.norm(p=2, dim=dim, keepdim=True).clamp_min(eps)


def euclidean_dist(x, y):
    """Euclidean distances between the rows of x [M, d] and y [N, d] -> [M, N].

    Uses |x|^2 + |y|^2 - 2 x.y, clamped at 1e-12 before the square root so that the gradient
    stays finite for identical vectors."""
    if x.dim() != 2 or y.dim() != 2 or x.size(1) != y.size(1):
        raise ValueError(f"euclidean_dist expects x [M, d] and y [N, d], got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    xx = x.pow(2).sum(1, keepdim=True)          # [M, 1]
    yy = y.pow(2).sum(1, keepdim=True).t()      # [1, N]
    d2 = torch.addmm(xx + yy, x, y.t(), alpha=-2.)  # [M, N]
    return d2.clamp_min(1e-12).sqrt()


def _sigmoid_of_dist(d2, inplace=False):
    """Squared stripe distances d^2 -> sigmoid(d), clamped at 1e-12 before the square root.

    The element map of the paper, (e^d - 1) / (e^d + 1) = tanh(d / 2), equals 2 sigmoid(d) - 1.
    Every monotone path through an m x n grid visits m + n - 1 cells, so the path sum of the
    map is 2 (path sum of sigmoid(d)) - (m + n - 1), and the same path is shortest for both:
    the callers run on sigmoid(d) and apply the affine map to the sums, which saves two full
    passes over the grid (and sigmoid is several times cheaper than tanh on CPUs)."""
    if inplace:
        return d2.clamp_min_(1e-12).sqrt_().sigmoid_()
    return torch.sigmoid(d2.clamp_min(1e-12).sqrt())


def _shortest_path_cells_first(dist):
    """Shortest monotone path sum for dist [m, n, *P] (grid first, path dims after) -> [*P].

    The dynamic programme D[i, j] = dist[i, j] + min(D[i-1, j], D[i, j-1]) is swept along the
    m + n - 1 anti-diagonals i + j = k; every cell of a diagonal, for all paths at once, is one
    tensor operation. Whatever the strides of `dist`, the cells (i, k - i) of a diagonal are
    equally spaced in memory (step stride_i - stride_j), so each diagonal is a strided view,
    not a gather or a copy. Out-of-place, hence differentiable."""
    m, n = dist.shape[:2]
    if m == 1 or n == 1:
        return dist.sum(dim=(0, 1))
    s_i, s_j = dist.stride(0), dist.stride(1)
    tail_size, tail_stride = list(dist.shape[2:]), list(dist.stride()[2:])
    offset = dist.storage_offset()

    def diagonal(k, lo, hi):            # cells (lo, k - lo) ... (hi, k - hi): [hi - lo + 1, *P]
        return dist.as_strided([hi - lo + 1] + tail_size, [s_i - s_j] + tail_stride,
                               offset + lo * s_i + (k - lo) * s_j)

    prev = dist[0:1, 0]                             # diagonal 0: cell (0, 0)
    prev_lo, prev_hi = 0, 0                         # row range of the previous diagonal
    for k in range(1, m + n - 1):
        lo, hi = max(0, k - n + 1), min(k, m - 1)
        cells = diagonal(k, lo, hi)
        # Rows i in [a, b] have both predecessors: up (i-1, j) and left (i, j-1).
        a, b = max(lo, prev_lo + 1), min(hi, prev_hi)
        up = prev[a - 1 - prev_lo:b - prev_lo]
        left = prev[a - prev_lo:b + 1 - prev_lo]
        parts = []
        if lo < a:      # cell (0, k): reached only from the left
            parts.append(cells[:1] + prev[:1])
        parts.append(cells[a - lo:b + 1 - lo] + torch.minimum(up, left))
        if hi > b:      # cell (k, 0): reached only from above
            parts.append(cells[-1:] + prev[-1:])
        prev = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        prev_lo, prev_hi = lo, hi
    return prev[0]


def shortest_path(dist):
    """Shortest path through a distance grid, as in AlignedReID's aligned local distance.

    dist [..., m, n] -> [...]: the minimum, over all paths from cell (0, 0) to (m-1, n-1)
    that step right or down, of the sum of the cells visited. Exact, differentiable, on any
    device; vectorised over the leading dims and along anti-diagonals."""
    if dist.dim() < 2:
        raise ValueError(f"shortest_path expects dist [..., m, n], got {tuple(dist.shape)}")
    lead = dist.shape[:-2]
    m, n = dist.shape[-2:]
    cells_first = dist.reshape(-1, m, n).permute(1, 2, 0).contiguous()   # [m, n, P]
    return _shortest_path_cells_first(cells_first).reshape(lead)


def _check_stripes(x, y, aligned, name):
    if x.dim() != 3 or y.dim() != 3 or x.size(-1) != y.size(-1):
        raise ValueError(f"{name} expects x [*, m, d] and y [*, n, d], got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if not aligned and x.size(1) != y.size(1):
        raise ValueError(f"{name}(aligned=False) sums the diagonal and needs the same number of "
                         f"stripes, got m={x.size(1)} and n={y.size(1)}")


def local_dist(x, y, block_size=None, aligned=True):
    """Local distance between every pair of x [M, m, d] and y [N, n, d] -> [M, N].

    Stripe-to-stripe Euclidean distances d [m, n] are mapped by (e^d - 1) / (e^d + 1); the
    aligned distance is the shortest right/down path through that grid (`shortest_path`),
    the unaligned one (aligned=False, needs m == n) the sum of its diagonal. Rows of x are
    processed `block_size` at a time (default: about 8M grid cells per block), so memory
    stays bounded for query x gallery matrices. Half-precision inputs are computed in float32.
    Differentiable."""
    _check_stripes(x, y, aligned, "local_dist")
    if x.dtype in (torch.float16, torch.bfloat16) or y.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    M, m, _ = x.shape
    N, n, _ = y.shape
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // max(1, N * m * n))
    if block_size < 1:
        raise ValueError(f"local_dist: block_size must be >= 1, got {block_size}")
    need_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    # One matmul gives d^2 = |x|^2 + |y|^2 - 2 x.y for every stripe pair, with the norms
    # folded in as two extra columns: [x, |x|^2, 1] . [-2 y, 1, |y|^2].
    y_aug = torch.cat([-2. * y, y.new_ones(N, n, 1), y.pow(2).sum(-1, keepdim=True)], -1)
    y_aug = y_aug.transpose(0, 1).reshape(n * N, -1)  # [n * N, d + 2]
    out = []
    for start in range(0, M, block_size):
        xb = x[start:start + block_size]              # [B, m, d]
        B = xb.size(0)
        x_aug = torch.cat([xb, xb.pow(2).sum(-1, keepdim=True), xb.new_ones(B, m, 1)], -1)
        if aligned:
            grid = x_aug.transpose(0, 1).reshape(m * B, -1) @ y_aug.t()        # [m * B, n * N]
        else:
            x_aug = x_aug.transpose(0, 1)                                       # [m, B, d + 2]
            grid = torch.bmm(x_aug, y_aug.view(n, N, -1).transpose(1, 2))      # [m, B, N]
        grid = _sigmoid_of_dist(grid, inplace=not need_grad)
        if aligned:
            # [m, n, B, N] view of the [m, B, n, N] matrix: each grid cell is B rows of N
            # contiguous pairs, and the shortest-path sweep reads the diagonals in place.
            grid = grid.view(m, B, n, N).transpose(1, 2)
            out.append(2. * _shortest_path_cells_first(grid) - (m + n - 1))
        else:
            out.append(2. * grid.sum(0) - m)
    if not out:
        return x.new_zeros(0, N)
    return torch.cat(out, 0)


def batch_local_dist(x, y, aligned=True):
    """Local distance between paired rows of x [N, m, d] and y [N, n, d] -> [N].

    Same distance as `local_dist` (element map, then shortest path or diagonal sum), for
    the N pairs (x[i], y[i]) only, as the triplet loss needs during training."""
    _check_stripes(x, y, aligned, "batch_local_dist")
    if x.size(0) != y.size(0):
        raise ValueError(f"batch_local_dist needs as many rows in x as in y, got "
                         f"{x.size(0)} and {y.size(0)}")
    m, n = x.size(1), y.size(1)
    if not aligned:
        return 2. * _sigmoid_of_dist((x - y).pow(2).sum(-1)).sum(-1) - m
    xx = x.pow(2).sum(-1)                            # [N, m]
    yy = y.pow(2).sum(-1)                            # [N, n]
    d2 = xx[:, :, None] + yy[:, None, :] - 2. * torch.bmm(x, y.transpose(1, 2))  # [N, m, n]
    grid = _sigmoid_of_dist(d2).permute(1, 2, 0)                                # [m, n, N]
    return 2. * _shortest_path_cells_first(grid) - (m + n - 1)


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
            l_ap, l_an = batch_local_dist(lf.repeat(2, 1, 1), lf[torch.cat([p_inds, n_inds])]).chunk(2)
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
