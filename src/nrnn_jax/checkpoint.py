"""Checkpoints with orbax: atomic (orbax writes to a temporary folder, then renames), step-numbered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def _manager(ckpt_dir: str | Path, max_to_keep: int | None = 2) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(ckpt_dir).absolute(), options=options)


def save_checkpoint(ckpt_dir: str | Path, step: int, tree: Any, *, max_to_keep: int | None = 2) -> None:
    """Save a pytree of arrays as checkpoint `step` (older ones beyond `max_to_keep` are removed)."""
    with _manager(ckpt_dir, max_to_keep) as mngr:
        mngr.save(int(step), args=ocp.args.StandardSave(tree), force=True)
        mngr.wait_until_finished()


def latest_step(ckpt_dir: str | Path) -> int | None:
    if not Path(ckpt_dir).exists():
        return None
    with _manager(ckpt_dir) as mngr:
        return mngr.latest_step()


def restore_checkpoint(ckpt_dir: str | Path, target: Any, step: int | None = None) -> tuple[Any, int]:
    """Restore checkpoint `step` (default: the latest) into the structure, shapes and dtypes of `target`."""
    with _manager(ckpt_dir) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {ckpt_dir}.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return mngr.restore(step, args=ocp.args.StandardRestore(abstract)), step


def delete_after(ckpt_dir: str | Path, step: int) -> None:
    """Remove the checkpoints of steps after `step` (a trajectory abandoned by a divergence rollback)."""
    if not Path(ckpt_dir).exists():
        return
    with _manager(ckpt_dir) as mngr:
        for s in mngr.all_steps():
            if s > step:
                mngr.delete(s)
