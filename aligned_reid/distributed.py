"""torch.distributed under torchrun: starting the process group, this process's rank, barriers, and
gathers / reductions of Python objects, arrays and scalars (identities in a single-process run)."""
import datetime
import io
import os
import pickle

import numpy as np
import torch
import torch.distributed as dist


def init_distributed(device='cuda', timeout_minutes=120):
    """Starts torch.distributed when launched by torchrun (WORLD_SIZE > 1 in the environment).

    Uses NCCL for CUDA devices and gloo otherwise. The generous collective timeout lets the other
    ranks wait while rank 0 alone tests a model. Returns (rank, world_size, local_rank);
    (0, 1, 0) for a plain single-process run.
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        return 0, 1, 0
    rank = int(os.environ['RANK'])
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if not dist.is_initialized():
        backend = 'nccl' if str(device).startswith('cuda') else 'gloo'
        if backend == 'nccl':
            check_gpu_count(int(os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)))
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, init_method='env://',
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return rank, world_size, local_rank


def check_gpu_count(processes):
    """SystemExit with one line when `processes` per machine (torchrun --nproc_per_node) exceed the GPUs
    this process can see; rank 0 of the machine says why, the others exit quietly."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if processes <= visible:
        return
    if os.environ.get('LOCAL_RANK', '0') != '0':
        raise SystemExit(1)
    seen = ' (CUDA_VISIBLE_DEVICES={})'.format(os.environ['CUDA_VISIBLE_DEVICES']) \
        if 'CUDA_VISIBLE_DEVICES' in os.environ else ''
    fix = 'pass --nproc_per_node={} or fewer, or --device cpu'.format(visible) if visible else 'pass --device cpu'
    raise SystemExit('torchrun started {} processes on this machine, but it sees {} GPU(s){}: {}'.format(
        processes, visible, seen, fix))


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main():
    """True on rank 0 (and in a single-process run): the only rank that logs and writes."""
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def cleanup_distributed():
    if is_dist():
        dist.destroy_process_group()


def all_gather_object(obj):
    """Gathers any picklable object from every rank; returns the list ordered by rank.

    Objects of any (and different) size are fine: they are pickled, padded to the longest,
    and gathered as byte tensors on the process group's device.
    """
    if not is_dist():
        return [obj]
    world = dist.get_world_size()
    backend = dist.get_backend()
    device = torch.device('cuda', torch.cuda.current_device()) if backend == 'nccl' else torch.device('cpu')
    buf = io.BytesIO()
    pickle.dump(obj, buf, protocol=pickle.HIGHEST_PROTOCOL)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    max_size = int(max(s.item() for s in sizes))
    padded = torch.zeros(max_size, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    out = [torch.zeros(max_size, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(out, padded)
    return [pickle.loads(o[:int(s.item())].cpu().numpy().tobytes()) for o, s in zip(out, sizes)]


def all_gather_arrays(array):
    """Concatenates a numpy array (first axis may differ per rank) from all ranks, in rank order."""
    parts = all_gather_object(np.asarray(array))
    return np.concatenate(parts, axis=0)


def all_gather_feature_dict(feats):
    """Concatenates every array-valued entry of a feature dict (as from extract_features) over ranks.

    Entries are numpy arrays or torch tensors sharing their first axis; they come back as numpy.
    """
    local = {k: (v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)) for k, v in feats.items()}
    parts = all_gather_object(local)
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in local}


def reduce_mean_scalars(values):
    """Averages a dict of python floats over ranks (identity when not distributed)."""
    if not is_dist() or not values:
        return dict(values)
    keys = sorted(values)
    backend = dist.get_backend()
    device = torch.device('cuda', torch.cuda.current_device()) if backend == 'nccl' else torch.device('cpu')
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(x) for k, x in zip(keys, t.tolist())}
