"""Wrap a model for data-parallel training without touching the model file.

    model = wrap_model(model.to(device), strategy=cfg.parallel, device=device)

- "ddp" (the default for our generators): every rank holds the full model; gradients are averaged in the backward.
- "fsdp": FSDP2 (`fully_shard`), one unit per transformer block (found in `model.blocks`), then the root, so
  parameters, gradients and optimiser state are sharded across ranks and gathered one block at a time. Optional
  mixed precision: bf16 parameters for compute, gradients reduced in fp32, fp32 master weights kept sharded.
- "none": the model as it is (each rank trains alone).

In a single process every strategy returns the model unchanged: there is nothing to average or shard.
`unwrap` and `full_state_dict` give the plain module and a full CPU state dict back for EMA and checkpoints;
`full_optimizer_state_dict` does the same for the optimiser, in one layout (keyed by parameter name) whatever the
strategy, so a checkpoint written under one strategy resumes under another.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from drifting.train.dist import world_size

__all__ = [
    "STRATEGIES", "full_optimizer_state_dict", "full_state_dict", "load_full_optimizer_state_dict",
    "is_sharded", "load_full_state_dict", "set_gradient_sync", "unwrap", "wrap_model",
]

STRATEGIES = ("ddp", "fsdp", "none")


def wrap_model(
    model: nn.Module,
    *,
    strategy: str = "ddp",
    device: torch.device | str,
    mixed_precision: bool = False,
    blocks_attr: str = "blocks",
) -> nn.Module:
    """Return `model` wrapped for `strategy` (see the module docstring); `model` must already be on `device`.

    Args:
        strategy: "ddp", "fsdp" or "none".
        device: this rank's device (from `init_distributed`); gives DDP its device_ids and FSDP its mesh type.
        mixed_precision: FSDP only: compute with bf16 parameters, reduce gradients in fp32. (With DDP, use autocast.)
        blocks_attr: the attribute listing the blocks that become FSDP units (an nn.ModuleList / iterable of
            modules); if the model has none, only the root is sharded.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown parallel strategy {strategy!r}; expected one of {STRATEGIES}")
    if mixed_precision and strategy != "fsdp":
        raise ValueError("mixed_precision applies to strategy='fsdp' only; use torch.autocast with DDP")
    if strategy == "none" or world_size() == 1:
        return model
    device = torch.device(device)
    if strategy == "ddp":
        # find_unused_parameters=False: every parameter gets a gradient each step, and the unused-parameter search
        # costs a graph traversal per step. A model that breaks this fails loudly in DDP's reducer, not silently.
        # broadcast_buffers=False: the buffers of the models trained here are constants built from the config (the
        # DiT's RoPE tables), equal on every rank after DDP's initial sync; broadcasting them from rank 0 before
        # every forward would add a collective, and a wait for rank 0, to each forward. (A model with running
        # statistics, e.g. BatchNorm, would keep one set per rank.)
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False,
            broadcast_buffers=False,
        )
    return _fully_shard(model, device, mixed_precision, blocks_attr)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and torch.compile wrappers (FSDP2 shards in place and needs no unwrapping)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A complete, unsharded state dict on CPU, with the plain module's key names.

    Under FSDP2 this is a collective (every rank must call it) that gathers the shards to CPU one tensor at a time;
    only rank 0 receives them (the others get {}), which is what a rank-0 checkpoint write needs. Otherwise local.
    """
    model = unwrap(model)
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_full_state_dict(model: nn.Module, state: dict[str, Any], *, strict: bool = True) -> None:
    """Load a full state dict (from `full_state_dict` or a checkpoint) into a plain, DDP or FSDP2 model.

    Under FSDP2 every rank passes the full state dict and keeps its own shard (a collective).
    """
    model = unwrap(model)
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))
    else:
        model.load_state_dict(state, strict=strict)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is FSDP2-sharded (its forward then needs every rank, its state dicts are collectives)."""
    return _is_fsdp(unwrap(model))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's complete state on CPU, keyed by parameter name (torch.distributed.checkpoint's layout).

    A collective under FSDP2 (every rank calls it; rank 0 receives the gathered state). Works the same for a plain
    or DDP model, so checkpoints do not depend on the strategy that wrote them.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(unwrap(model), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load `full_optimizer_state_dict`'s output; under FSDP2 every rank passes it whole and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))


def set_gradient_sync(model: nn.Module, sync: bool):
    """A context for one backward of gradient accumulation: with sync=False, gradients stay local (no all-reduce or
    reduce-scatter) and add up until a backward with sync=True. DDP: `no_sync`; FSDP2: `set_requires_gradient_sync`.
    """
    if sync or world_size() == 1:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    inner = unwrap(model)
    if _is_fsdp(inner):
        @contextlib.contextmanager
        def unsynced():
            inner.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                inner.set_requires_gradient_sync(True)

        return unsynced()
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- internals


def _fsdp_api():
    try:  # public since torch 2.6
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch 2.4-2.5
        from torch.distributed._composable.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    return FSDPModule, MixedPrecisionPolicy, fully_shard


def _is_fsdp(model: nn.Module) -> bool:
    return isinstance(model, _fsdp_api()[0])


def _fully_shard(model: nn.Module, device: torch.device, mixed_precision: bool, blocks_attr: str) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    _, MixedPrecisionPolicy, fully_shard = _fsdp_api()
    mesh = init_device_mesh(device.type, (world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else None
    kwargs = {"mesh": mesh} | ({"mp_policy": mp} if mp is not None else {})
    blocks = list(getattr(model, blocks_attr, None) or [])
    for i, block in enumerate(blocks):
        # The last block's backward runs right after its forward: resharding it in between would only force a
        # second all-gather (torchtitan does the same).
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    # The root unit holds what is left (embeddings, final layer) and drives the prefetching of the blocks.
    fully_shard(model, **kwargs)
    return model
