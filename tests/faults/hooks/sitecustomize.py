"""Fault-injection hooks for subprocesses started by tests/faults (put this folder first on
PYTHONPATH). Inert unless ``TEXT2SQL_FAULT_HOOK_DELAY`` is set.

They widen the windows a kill -9 must be able to land in, and announce them on stderr so a test
can kill deterministically inside one: every file copied into the run store's checkpoint folder
(``shutil.copytree`` -> one ``FAULT-HOOK copy`` line per file) and every file deleted by
checkpoint garbage collection (``os.unlink`` with ``dir_fd``, as ``shutil.rmtree`` does it ->
``FAULT-HOOK unlink <folder> <file>``) sleeps ``TEXT2SQL_FAULT_HOOK_DELAY`` seconds first.
"""

import os

_DELAY = os.environ.get("TEXT2SQL_FAULT_HOOK_DELAY")

if _DELAY:
    import shutil
    import sys
    import time

    _delay = float(_DELAY)
    _copy2 = shutil.copy2
    _copytree = shutil.copytree
    _unlink = os.unlink

    def _slow_copy2(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        print(f"FAULT-HOOK copy {os.path.basename(str(src))}", file=sys.stderr, flush=True)
        time.sleep(_delay)
        return _copy2(src, dst, *args, **kwargs)

    def _slow_copytree(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["copy_function"] = _slow_copy2
        return _copytree(src, dst, *args, **kwargs)

    _rmtree = shutil.rmtree
    _removing = ["?"]  # the folder shutil.rmtree is deleting (it unlinks by dir_fd + name)

    def _named_rmtree(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        _removing[0] = str(path)
        return _rmtree(path, *args, **kwargs)

    def _slow_unlink(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("dir_fd") is not None:
            print(f"FAULT-HOOK unlink {_removing[0]} {path}", file=sys.stderr, flush=True)
            time.sleep(_delay)
        return _unlink(path, *args, **kwargs)

    shutil.copytree = _slow_copytree
    shutil.rmtree = _named_rmtree
    os.unlink = _slow_unlink
