"""Files written whole or not at all: the checkpoint, args.json and metrics.json, partitions.pkl,
the chunks of a features file, search results and ONNX exports all go through atomic_write."""
import contextlib
import os
import re

TEMP_SUFFIX = re.compile(r'\.tmp\.(\d+)$')   # atomic_write's temporaries: <name>.tmp.<pid>


def fsync_dir(folder):
    """Makes a rename inside `folder` durable (no-op where a folder cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode='wb', **open_kwargs):
    """Yields a file open on `<path>.tmp.<pid>` in path's folder (made when missing). When the block
    ends normally the file is flushed, fsync-ed and renamed over `path`, so `path` holds its previous
    bytes or all the new ones, never a part; when the block or the write raises, the temporary is
    removed and `path` is untouched. A kill -9 may leave the temporary: remove_stale_temp_files clears
    those of dead processes. New files get the mode the user's umask gives (open's own)."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    tmp = '{}.tmp.{}'.format(path, os.getpid())
    os.makedirs(folder, exist_ok=True)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
    fsync_dir(folder)


def _pid_alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder):
    """Removes the `<name>.tmp.<pid>` files that a killed atomic_write left in `folder` (those whose
    process no longer runs). Returns [(path, size in bytes)] of the files removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = TEMP_SUFFIX.search(e.name)
        if m is None or not e.is_file(follow_symlinks=False) or _pid_alive(int(m.group(1))):
            continue
        size = e.stat(follow_symlinks=False).st_size
        try:
            os.remove(e.path)
        except OSError:
            continue
        removed.append((e.path, size))
    return removed
