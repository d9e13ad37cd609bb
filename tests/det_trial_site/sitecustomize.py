"""Point Determined's trial-info loaders at a test's container folder (tests/det_trial.py).

In a task container the agent provides ``/run/determined/info/{cluster,trial,rendezvous,
resources}.json``; tests cannot write there (every test on the machine would share it), so when
``TEXT2SQL_TEST_DET_INFO_DIR`` is set, every Python process of the trial (the launcher, torchrun,
each rank) reads the same four files from that folder instead. Nothing else is changed.
"""

import os

_INFO_DIR = os.environ.get("TEXT2SQL_TEST_DET_INFO_DIR")

if _INFO_DIR:
    from determined import _info

    for _cls, _name in (
        (_info.ClusterInfo, "cluster.json"),
        (_info.TrialInfo, "trial.json"),
        (_info.RendezvousInfo, "rendezvous.json"),
        (_info.ResourcesInfo, "resources.json"),
    ):
        _cls._from_file.__func__.__defaults__ = (os.path.join(_INFO_DIR, _name),)
