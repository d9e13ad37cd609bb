"""One rank of a trial that saves one checkpoint, measuring what this rank reads while
`FixedDetCallback.on_save` uploads it (tests/test_checkpoint_upload.py launches it with the real
``determined.launch.torch_distributed``; the master is tests/det_trial.py's stand-in).

The files are laid out as HF's Trainer and DeepSpeed write them for a ZeRO run: the chief writes
the consolidated model, ``latest`` and the model states; every rank writes its ZeRO optimizer
shard and its RNG state. ``PROBE_SHARD_MB`` sizes each shard; ``PROBE_NODE_LOCAL=1`` gives each
rank its own output folder (two nodes with local disks) instead of one shared by both ranks.
Each rank writes ``<PROBE_OUT>/rank<r>.json``: bytes read (``/proc/self/io`` rchar) during the
upload, and the storage id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STEP = 2


def rchar() -> int:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


def main() -> None:
    import determined as det
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from trainer.callbacks import fixed_det_callback_class

    out = Path(os.environ["PROBE_OUT"])
    shard = int(os.environ.get("PROBE_SHARD_MB", "32")) << 20
    distributed = det.core.DistributedContext.from_torch_distributed()
    rank = distributed.rank
    output_dir = out / (f"node{rank}" if os.environ.get("PROBE_NODE_LOCAL") == "1" else "shared")
    with det.core.init(
        distributed=distributed, tensorboard_mode=det.core.TensorboardMode.MANUAL
    ) as core_context:
        args = TrainingArguments(
            output_dir=str(output_dir), max_steps=4, use_cpu=True, report_to="none"
        )
        callback = fixed_det_callback_class()(core_context, args)
        ckpt = output_dir / f"checkpoint-{STEP}"
        zero = ckpt / f"global_step{STEP}"
        zero.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            (ckpt / "model.safetensors").write_bytes(os.urandom(1 << 20))
            (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": STEP}))
            (ckpt / "latest").write_text(f"global_step{STEP}")
            (zero / "mp_rank_00_model_states.pt").write_bytes(os.urandom(1 << 20))
        (zero / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(shard))
        (ckpt / f"rng_state_{rank}.pth").write_bytes(os.urandom(4096))
        # An older checkpoint still in the folder: not part of this save.
        (output_dir / "checkpoint-1").mkdir(exist_ok=True)
        (output_dir / "checkpoint-1" / f"stale_{rank}.bin").write_bytes(b"x" * 1024)

        state = TrainerState(global_step=STEP, max_steps=4)
        state.is_world_process_zero = rank == 0
        before = rchar()
        callback.on_save(args, state, TrainerControl())
        read = rchar() - before
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "read": read}))


if __name__ == "__main__":
    main()
