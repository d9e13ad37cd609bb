"""Who reads what when two ranks upload one checkpoint (issue 12, finding 5).

Two ranks under the real ``determined.launch.torch_distributed`` (torchrun, Determined's
``DistributedContext`` over ZMQ) save one DeepSpeed-style checkpoint and call
`FixedDetCallback.on_save`, which uploads it with Determined's own `CheckpointContext` to
``directory`` checkpoint storage; the master is tests/det_trial.py's stand-in. Each rank
measures the bytes it reads during the upload (``/proc/self/io`` rchar), see
tests/det_probes/checkpoint_upload.py.

- One node (one output folder for both ranks): upstream `DetCallback` had every rank list the
  folder, so every file was a "conflict" that every rank read whole for an MD5 -- for DDP
  TinyLlama the 8.8 GB ``optimizer.pt`` on each rank at every save. Now only the chief reads,
  and each file once (the copy into storage).
- Two nodes (a node-local folder per rank): each node's files, its ZeRO shard and RNG state
  included, still reach storage.

Run: ``HF_HUB_OFFLINE=1 python -m pytest tests/test_checkpoint_upload.py -q``
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.det_trial import TrialContainer, iter_files, running_master

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARD_MB = 24
ENTRYPOINT = (
    "python -m determined.launch.torch_distributed python -m tests.det_probes.checkpoint_upload"
)
CONFIG = {
    "name": "upload-probe",
    "entrypoint": ENTRYPOINT,
    "resources": {"slots_per_trial": 2},
    "searcher": {"name": "single", "metric": "eval_loss", "smaller_is_better": True},
    "max_restarts": 0,
}


def upload(tmp_path: Path, *, node_local: bool) -> tuple[dict[int, int], dict[str, int], Path]:
    """Run the probe on 2 ranks; (bytes read per rank, resources the master got, stored copy)."""
    storage = tmp_path / "storage"
    config = {**CONFIG, "checkpoint_storage": {"type": "directory", "container_path": str(storage)}}
    out = tmp_path / "out"
    out.mkdir()
    with running_master() as master:
        container = TrialContainer(tmp_path / "container", config, {}, master.url, slots=2).write()
        proc = container.run(
            ENTRYPOINT,
            cwd=REPO_ROOT,
            extra_env={
                "PROBE_OUT": str(out),
                "PROBE_SHARD_MB": str(SHARD_MB),
                "PROBE_NODE_LOCAL": "1" if node_local else "0",
                "OMP_NUM_THREADS": "1",
            },
            timeout=300,
        )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert not master.unknown and not master.errors, (master.unknown, master.errors)
    assert len(master.checkpoints) == 1, master.checkpoints
    ckpt = master.checkpoints[0]
    assert ckpt["metadata"] == {"steps_completed": 2, "trial_id": 1}
    reads = {}
    for rank in (0, 1):
        result = json.loads((out / f"rank{rank}.json").read_text())
        reads[rank] = int(result["read"])
    resources = {k: int(v) for k, v in ckpt["resources"].items() if not k.endswith("/")}
    return reads, resources, storage / ckpt["uuid"]


def expected_files() -> set[str]:
    step = "checkpoint-2"
    zero = f"{step}/global_step2"
    return {
        f"{step}/model.safetensors",
        f"{step}/trainer_state.json",
        f"{step}/latest",
        f"{step}/rng_state_0.pth",
        f"{step}/rng_state_1.pth",
        f"{zero}/mp_rank_00_model_states.pt",
        f"{zero}/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        f"{zero}/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }


def test_one_node_only_the_chief_reads_each_file_once(tmp_path: Path) -> None:
    reads, resources, stored = upload(tmp_path, node_local=False)
    total = sum(resources.values())
    assert set(resources) == expected_files()  # this step only: not checkpoint-1/
    on_disk = dict(iter_files(stored))
    assert "metadata.json" in on_disk
    assert {k: v for k, v in on_disk.items() if k != "metadata.json"} == resources
    shard = SHARD_MB << 20
    # rank 1 uploads nothing and reads nothing (upstream: every file, whole, for an MD5).
    assert reads[1] < shard // 8, f"rank 1 read {reads[1] >> 20} MB"
    # rank 0 copies each file into storage once (upstream: once more for the MD5).
    assert total <= reads[0] < total + shard // 2, f"rank 0 read {reads[0] >> 20} MB of {total}"


def test_node_local_folders_each_upload_their_own_shards(tmp_path: Path) -> None:
    reads, resources, stored = upload(tmp_path, node_local=True)
    assert set(resources) == expected_files()  # both nodes' shards and RNG states
    on_disk = dict(iter_files(stored))
    assert {k: v for k, v in on_disk.items() if k != "metadata.json"} == resources
    shard = SHARD_MB << 20
    # Each node's uploader reads its own files once; nobody reads the other's.
    assert shard <= reads[1] < shard + shard // 2, reads
    assert shard <= reads[0] < shard + (4 << 20) + shard // 2, reads
