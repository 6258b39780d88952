"""The device mesh: dp_replicate × dp_shard × cp × tp, from the `parallel` config."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from bigvit.errors import ConfigError

DIM_NAMES = ("dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Number of distinct data streams: ranks within a cp×tp group see the same batch."""
        return self.dp_replicate * self.dp_shard


def resolve_dims(cfg, world_size: int) -> ParallelDims:
    """Degrees from config with at most one -1 filled from the world size; errors name the bad key."""
    degrees = {name: cfg.get(name, 1) for name in DIM_NAMES}
    integer = lambda v: isinstance(v, int) and not isinstance(v, bool)
    bad = [f"parallel.{k}={v!r}" for k, v in degrees.items() if not integer(v) or v == 0 or v < -1]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: parallel degrees must be positive or -1 (fill)")
    fill = [k for k, v in degrees.items() if v == -1]
    if len(fill) > 1:
        named = ", ".join(f"parallel.{k}=-1" for k in fill)
        raise ConfigError(f"only one parallel degree may be -1; got {named}")
    fixed = 1
    for value in degrees.values():
        fixed *= value if value > 0 else 1
    if fill:
        if world_size % fixed:
            raise ConfigError(
                f"parallel.{fill[0]}=-1 cannot fill world size {world_size}: the other degrees "
                f"{ {k: v for k, v in degrees.items() if v > 0} } multiply to {fixed}, which does not divide it"
            )
        degrees[fill[0]] = world_size // fixed
    dims = ParallelDims(**degrees)
    if dims.world_size != world_size:
        raise ConfigError(
            f"parallel layout {' × '.join(f'parallel.{k}={degrees[k]}' for k in DIM_NAMES)} "
            f"= {dims.world_size} ranks, but the world size is {world_size}; set one degree to -1 to fill"
        )
    return dims


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    return init_device_mesh(device_type, tuple(getattr(dims, n) for n in DIM_NAMES), mesh_dim_names=DIM_NAMES)


def dp_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The mesh FSDP shards over: 1-D dp_shard, or 2-D (dp_replicate, dp_shard) for HSDP.

    With context parallelism dp_shard is flattened with cp into "dp_shard_cp": cp ranks hold partial
    gradients of the same parameters (see parallel/context.py), so they shard and average with the
    data-parallel ranks.
    """
    if dims.cp == 1:
        return mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
    if dims.dp_replicate == 1:
        return mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    # Slicing a flattened dim from the root mesh is deprecated: flatten all dp dims, then split off replicas.
    flat = mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    return flat._unflatten(0, (dims.dp_replicate, dims.dp_shard * dims.cp), ("dp_replicate", "dp_shard_cp"))
