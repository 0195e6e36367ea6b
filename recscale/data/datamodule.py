"""Streaming DataModule over prepared Parquet shards.

Work split. The unit of I/O is a Parquet row group. For an epoch, the units of a split are laid end to end (train: in an
order permuted by ``(seed, epoch)``; valid/test: file order) and that row stream is cut into contiguous ranges:

* across DDP ranks: train gives every rank ``n = R // world`` rows, so every rank makes the same number of optimizer
  steps (unequal counts deadlock DDP). The ``R % world`` leftover rows (fewer than ``world``; none on one process)
  are the last rows of that epoch's permuted order and sit this epoch out; the order changes every epoch, so no row is
  left out systematically. Valid/test give rank ``r`` rows ``[r*R//world, (r+1)*R//world)``: every row exactly once.
* across loader workers of one rank: whole batches, contiguous, the last worker also taking the final partial batch,
  so a rank's batch count depends only on its row count.

Train batches come out of a bounded shuffle buffer (``shuffle_buffer`` rows, permuted by ``(seed, epoch, rank,
worker)``), on top of the global shuffle done at preparation. Batches are tensors cut from whole row groups: no per-row
Python, no per-row collate.

``device_cache=True`` replaces the stream by device-resident splits (``DeviceSplit``, ``DeviceBatches``, at the end of
this file): each rank loads its share once into the model's device memory (host RAM on the CPU) and serves batches
by an on-device permutation and gather.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import os

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recscale.data.formats import PrepareError
from recscale.data.spec import DataDirError, load_spec, shard_units
from recscale.models.backbones import ConfigError

Slice = tuple[int, int, int]  # (unit index, start row in unit, stop row in unit)


def _ranges_to_slices(order: np.ndarray, unit_rows: np.ndarray, lo: int, hi: int) -> list[Slice]:
    """Rows [lo, hi) of the stream made by the units in `order` -> slices of units."""
    if hi <= lo:
        return []
    ends = np.cumsum(unit_rows[order])
    starts = ends - unit_rows[order]
    out = []
    for k in range(int(np.searchsorted(ends, lo, side="right")), len(order)):
        if starts[k] >= hi:
            break
        a, b = max(lo, starts[k]), min(hi, ends[k])
        if b > a:
            out.append((int(order[k]), int(a - starts[k]), int(b - starts[k])))
    return out


def plan(unit_rows: list[int] | np.ndarray, *, rank: int, world: int, worker: int, num_workers: int, batch_size: int,
         train: bool, seed: int = 0, epoch: int = 0) -> list[Slice]:
    """The unit slices that (rank, worker) reads in one epoch (see the module docstring for the rules)."""
    rows = np.asarray(unit_rows, dtype=np.int64)
    total = int(rows.sum())
    if train:
        order = np.random.default_rng([seed, epoch]).permutation(len(rows))
        n = total // world
        lo = rank * n
    else:
        order = np.arange(len(rows))
        lo, n = rank * total // world, (rank + 1) * total // world - rank * total // world
    full = n // batch_size
    b0, b1 = worker * full // num_workers, (worker + 1) * full // num_workers
    start, stop = lo + b0 * batch_size, lo + b1 * batch_size
    if worker == num_workers - 1:
        stop = lo + n
    return _ranges_to_slices(order, rows, start, stop)


def batches_in(unit_rows, *, world: int, rank: int, num_workers: int, batch_size: int, train: bool) -> int:
    """Number of batches one rank yields in an epoch (the same for every epoch)."""
    return sum(
        -(-sum(b - a for _, a, b in plan(unit_rows, rank=rank, world=world, worker=w, num_workers=num_workers,
                                        batch_size=batch_size, train=train)) // batch_size)
        for w in range(num_workers)
    )


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardStream(IterableDataset):
    """Yields ``(ids int32 [B, F], label float32 [B])`` batches of one split for this rank and loader worker."""

    def __init__(self, units: list[tuple[str, int, int]], fields: list[str], batch_size: int, train: bool,
                 seed: int = 0, shuffle_buffer: int = 1 << 18, rank: int | None = None, world: int | None = None,
                 num_workers: int = 1):
        self.units, self.fields, self.batch_size, self.train = units, fields, batch_size, train
        self.seed, self.shuffle_buffer, self.epoch = seed, shuffle_buffer, 0
        self.rank, self.world, self.num_workers = rank, world, max(1, num_workers)
        self.unit_rows = np.array([u[2] for u in units], dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _where(self) -> tuple[int, int, int, int]:
        rank, world = (self.rank, self.world) if self.rank is not None else _dist()
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank, world or 1, worker, nw

    def __len__(self) -> int:
        rank, world, _, _ = self._where()
        return batches_in(self.unit_rows, world=world, rank=rank, num_workers=self.num_workers,
                          batch_size=self.batch_size, train=self.train)

    def _read(self, slices: list[Slice]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        files: dict[str, pq.ParquetFile] = {}
        for u, a, b in slices:
            path, group, _ = self.units[u]
            if path not in files:
                files = {path: pq.ParquetFile(path)}  # units of one file are usually consecutive
            try:
                t = files[path].read_row_group(group).slice(a, b - a)
            except OSError as e:
                raise DataDirError(f"shard {path} (row group {group}) cannot be read ({e}): re-run recscale prepare "
                                   "with --overwrite") from e
            # stack the columns field-major (memcpy per column), then one cache-friendly transpose to rows
            ids = np.ascontiguousarray(np.vstack([t.column(f).to_numpy() for f in self.fields]).T)
            yield ids, t.column("label").to_numpy().astype(np.float32)

    def iter_numpy(self, rank: int, world: int, worker: int, num_workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        B = self.batch_size
        slices = plan(self.unit_rows, rank=rank, world=world, worker=worker, num_workers=num_workers, batch_size=B,
                      train=self.train, seed=self.seed, epoch=self.epoch)
        if not self.train:
            buf_x, buf_y = np.empty((0, len(self.fields)), np.int32), np.empty(0, np.float32)
            for x, y in self._read(slices):
                buf_x, buf_y = np.concatenate([buf_x, x]), np.concatenate([buf_y, y])
                n = len(buf_y) // B * B
                for i in range(0, n, B):
                    yield buf_x[i : i + B], buf_y[i : i + B]
                buf_x, buf_y = buf_x[n:], buf_y[n:]
            if len(buf_y):
                yield buf_x, buf_y
            return
        rng = np.random.default_rng([self.seed, self.epoch, rank, worker, 7])
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        have = 0

        def drain(final: bool):
            x, y = np.concatenate(xs), np.concatenate(ys)
            p = rng.permutation(len(y))
            x, y = np.take(x, p, axis=0), np.take(y, p)  # np.take: ~10x faster than x[p] for 2-D rows
            n = len(y) if final else len(y) // B * B
            for i in range(0, n, B):
                yield x[i : i + B], y[i : i + B]
            return x[n:], y[n:]

        for x, y in self._read(slices):
            xs.append(x)
            ys.append(y)
            have += len(y)
            if have >= self.shuffle_buffer:
                rest_x, rest_y = yield from drain(False)
                xs, ys, have = [rest_x], [rest_y], len(rest_y)
        if have:
            yield from drain(True)

    def __iter__(self):
        rank, world, worker, nw = self._where()
        for x, y in self.iter_numpy(rank, world, worker, nw):
            yield torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


class EpochLoader(DataLoader):
    """A DataLoader that tells its dataset the epoch before workers start (Lightning only calls ``set_epoch`` on
    samplers, and an IterableDataset has none). Workers are not persistent, so each epoch sees the new value."""

    def __init__(self, dataset: ShardStream, epoch_fn: Callable[[], int], **kw):
        super().__init__(dataset, batch_size=None, **kw)
        self._epoch_fn = epoch_fn

    def __iter__(self):
        self.dataset.set_epoch(self._epoch_fn())
        return super().__iter__()


class DataOptionError(PrepareError, ValueError):
    """A ``--data.*`` option out of range (one line naming the option, no traceback)."""


class CTRDataModule(L.LightningDataModule):
    """Prepared CTR data (see ``recscale prepare``) streamed as whole batches.

    Args:
        data_dir: a directory written by ``recscale prepare`` (holds spec.json).
        batch_size: training batch size per process (the global batch under DDP is ``batch_size * world``).
        eval_batch_size: batch size for valid/test/predict (default: ``batch_size``).
        num_workers: loader worker processes per rank (0: load in the main process).
        shuffle_buffer: rows held in the training shuffle buffer (bounded memory: ``rows * (4F + 4)`` bytes).
        seed: seeds the per-epoch row-group order and the shuffle buffer (with the epoch, rank and worker).
        train_fraction: use only this fraction of the training rows (a prefix of the globally shuffled shards, so a
            uniform random subset fixed at preparation; ICML 2024 Table 2).
        device_cache: hold each split in the model's device memory (GPU memory; host RAM on the CPU), loaded once,
            each DDP rank only its share, and serve batches by an on-device permutation and gather (``DeviceBatches``:
            the stream's exactly-once, equal-batch-count and ``(seed, epoch)`` rules). ``num_workers`` and
            ``shuffle_buffer`` are then unused. Needs ``rows * (4 F + 4)`` bytes per rank for the training split plus
            the validation split (Criteo: 36.7M x 39 ids = 5.9 GB); a clear error names the shortfall otherwise.
    """

    def __init__(self, data_dir: str = "prepared/criteo_icml24", batch_size: int = 2048,
                 eval_batch_size: int | None = None, num_workers: int = 2, shuffle_buffer: int = 1 << 18,
                 seed: int = 0, train_fraction: float = 1.0, device_cache: bool = False):
        super().__init__()
        if batch_size <= 0:
            raise DataOptionError(f"--data.batch_size must be positive, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size <= 0:
            raise DataOptionError(f"--data.eval_batch_size must be positive, got {eval_batch_size}")
        if not 0.0 < train_fraction <= 1.0:
            raise DataOptionError(f"--data.train_fraction must be in (0, 1], got {train_fraction}")
        if num_workers < 0:
            raise DataOptionError(f"--data.num_workers must be >= 0, got {num_workers}")
        if shuffle_buffer <= 0:
            raise DataOptionError(f"--data.shuffle_buffer must be positive, got {shuffle_buffer}")
        self.save_hyperparameters(logger=False)  # the CLI logs the whole resolved config
        self.data_dir = Path(data_dir)
        self.spec = load_spec(self.data_dir)
        self.fields = [f["name"] for f in self.spec["fields"]]
        self.field_dims = [int(f["cardinality"]) for f in self.spec["fields"]]
        self._units: dict[str, list] = {}
        self._resident: dict[str, DeviceSplit] = {}

    def units(self, split: str) -> list[tuple[str, int, int]]:
        if split not in self._units:
            units = shard_units(self.data_dir, self.spec, split)
            if split == "train" and self.hparams.train_fraction < 1.0:
                units = _prefix(units, round(self.hparams.train_fraction * sum(u[2] for u in units)))
            self._units[split] = units
        return self._units[split]

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "valid"), "validate": ("valid",), "test": ("test",), "predict": ("test",)}
        for s in splits.get(stage or "fit", ("train", "valid", "test")):
            units = self.units(s)  # checks every shard before any training starts
            if sum(u[2] for u in units) == 0:  # e.g. a tiny input: nothing to train on, or no validation AUC
                rows = {k: v.get("rows", 0) for k, v in self.spec["splits"].items()}
                raise DataDirError(f"data directory {self.data_dir} has an empty {s} split ({rows}): prepare a larger "
                                   "input (the split is 8/1/1 by lines)")

    def _loader(self, split: str, train: bool) -> EpochLoader | DeviceBatches:
        hp = self.hparams
        bs = hp.batch_size if train else (hp.eval_batch_size or hp.batch_size)
        if hp.device_cache:
            return self._device_batches(split, bs, train)
        ds = ShardStream(self.units(split), self.fields, bs, train, seed=hp.seed, shuffle_buffer=hp.shuffle_buffer,
                         num_workers=hp.num_workers)
        trainer = self.trainer
        # a private generator: creating an iterator must not draw from the global RNG (that would shift dropout
        # masks by one draw per extra loader pass, e.g. the sanity check of a resumed fit)
        # the epoch Lightning gives samplers (fit_loop.epoch_progress.current.processed): right also for the iterator
        # Lightning creates before a resumed fit's first epoch, when trainer.current_epoch still lags by one
        epoch_fn = (lambda: trainer.fit_loop.epoch_progress.current.processed) if trainer is not None else (lambda: 0)
        return EpochLoader(ds, epoch_fn,
                           num_workers=hp.num_workers, persistent_workers=False,
                           generator=torch.Generator().manual_seed(hp.seed))

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("valid", False)

    def test_dataloader(self):
        return self._loader("test", False)

    def predict_dataloader(self):
        return self._loader("test", False)

    # ------------------------------------------------------------ device_cache=True
    def _device_batches(self, split: str, batch_size: int, train: bool) -> DeviceBatches:
        trainer = self.trainer
        if trainer is not None:
            rank, world, device = trainer.global_rank, trainer.world_size, trainer.strategy.root_device
        else:
            (rank, world), device = _dist(), torch.device("cpu")
        key = f"{split}@{device}"
        if key not in self._resident:
            self._resident[key] = DeviceSplit.load(self.units(split), self.fields, rank, world, device, split)
        epoch_fn = (lambda: trainer.fit_loop.epoch_progress.current.processed) if trainer is not None else (lambda: 0)
        return DeviceBatches(self._resident[key], batch_size, train, self.hparams.seed, epoch_fn)

    def teardown(self, stage: str) -> None:
        self._resident.clear()  # give the device memory back when a fit/validate/test ends


def _prefix(units, rows: int):
    out, left = [], max(rows, 1)
    for path, g, n in units:
        if left <= 0:
            break
        out.append((path, g, min(n, left)))
        left -= n
    return out


def sample_split(units: list[tuple[str, int, int]], fields: list[str], n: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """A fixed uniform random sample of ``min(n, rows)`` rows of a split (in split order), reading only the row groups
    that hold sampled rows: ``(ids int32 [n, F], label float32 [n])``."""
    rows = np.array([u[2] for u in units], dtype=np.int64)
    total = int(rows.sum())
    pick = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    starts = np.concatenate(([0], np.cumsum(rows)[:-1]))
    xs, ys = [], []
    ds = ShardStream(units, fields, 1, train=False)
    for u in np.unique(np.searchsorted(starts, pick, side="right") - 1):
        local = pick[(pick >= starts[u]) & (pick < starts[u] + rows[u])] - starts[u]
        x, y = next(ds._read([(int(u), 0, int(rows[u]))]))
        xs.append(x[local])
        ys.append(y[local])
    return np.concatenate(xs), np.concatenate(ys)


# ------------------------------------------------------------------------------------------------ device-resident data
class DeviceCacheError(ConfigError):
    """``data.device_cache`` cannot hold a split on the device; the message names the sizes and the fixes."""


def free_bytes(device: torch.device) -> int:
    """Memory available for new tensors on ``device``: CUDA's free memory (``torch.cuda.mem_get_info``), or the
    host's ``MemAvailable`` for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def share(total: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` (file order) that rank ``rank`` of ``world`` holds: contiguous, sizes differ by at most one.
    The shards are globally shuffled at preparation, so a contiguous share is a uniform random subset."""
    return rank * total // world, (rank + 1) * total // world


class DeviceSplit:
    """One rank's share of a split, resident on a device: ``x`` (n, F) int32 ids, ``y`` (n,) float32 labels, with
    ``total`` (rows of the split over all ranks), ``rank`` and ``world`` (what ``DeviceBatches`` needs)."""

    def __init__(self, x: Tensor, y: Tensor, total: int, rank: int = 0, world: int = 1):
        assert len(x) == len(y) == share(total, rank, world)[1] - share(total, rank, world)[0]
        self.x, self.y, self.total, self.rank, self.world = x, y, total, rank, world
        self.device = x.device

    def __len__(self) -> int:
        return len(self.y)

    @classmethod
    def load(cls, units: list[tuple[str, int, int]], fields: list[str], rank: int, world: int, device: torch.device,
             split: str = "train") -> DeviceSplit:
        """Read rank ``rank``'s share (``share``) of a split's shards once, row group by row group, straight into
        preallocated tensors on ``device`` (host memory in use: one row group). Checks first that it fits."""
        device = torch.device(device)
        unit_rows = np.array([u[2] for u in units], dtype=np.int64)
        total = int(unit_rows.sum())
        lo, hi = share(total, rank, world)
        n, F = hi - lo, len(fields)
        need, free = n * (4 * F + 4), free_bytes(device)
        if need > free:
            raise DeviceCacheError(
                f"data.device_cache: the {split} split's share of rank {rank} ({n:,} rows x {F} fields) needs "
                f"{need / 2**30:.2f} GiB on {device}, but only {free / 2**30:.2f} GiB is free there: set "
                "--data.device_cache false (stream from the shards), or spread the run over more GPUs "
                "(--trainer.strategy ddp: each rank holds 1/world of it), or use --data.train_fraction < 1")
        x = torch.empty((n, F), dtype=torch.int32, device=device)
        y = torch.empty(n, dtype=torch.float32, device=device)
        at = 0
        slices = _ranges_to_slices(np.arange(len(units)), unit_rows, lo, hi)
        for xb, yb in ShardStream(units, fields, 1, train=False)._read(slices):
            k = len(yb)
            x[at:at + k].copy_(torch.from_numpy(xb))
            y[at:at + k].copy_(torch.from_numpy(yb))
            at += k
        if at != n:
            raise DataDirError(f"{split} shards hold {at:,} rows where spec.json lists {n:,} for this share: re-run "
                               "recscale prepare with --overwrite")
        return cls(x, y, total, rank, world)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, 11]).generate_state(1, np.uint64)[0] >> 1)


class DeviceBatches:
    """Batches of a ``DeviceSplit`` (an iterable with ``len``, what Lightning accepts as a dataloader).

    Train: every rank delivers ``n = total // world`` rows per epoch (the same number of batches on every rank, as the
    stream); rank r permutes its share with a generator seeded by ``(seed, epoch, r)`` on the device, keeps the first
    ``n`` (a share holds ``n`` or ``n + 1`` rows: the spare row, if any, sits this epoch out and changes every epoch)
    and gathers batches ``x[perm[i:i+B]]`` on the device. Over ranks, no row is delivered twice and all but the
    ``total % world`` left-over rows are delivered. Valid/test: the share in file order, every row once.
    Unlike the stream, a rank keeps its share across epochs (it holds only that share in memory); the prepared
    shards are globally shuffled, so every share is a uniform random subset.
    """

    def __init__(self, split: DeviceSplit, batch_size: int, train: bool, seed: int = 0,
                 epoch_fn: Callable[[], int] = lambda: 0):
        self.split, self.batch_size, self.train, self.seed, self.epoch_fn = split, batch_size, train, seed, epoch_fn

    def rows(self) -> int:
        return self.split.total // self.split.world if self.train else len(self.split)

    def __len__(self) -> int:
        return -(-self.rows() // self.batch_size)

    def order(self, epoch: int) -> Tensor:
        """The rank's row order (indices into its share) for one training epoch, on the device."""
        dev = self.split.device
        g = torch.Generator(device=dev).manual_seed(_epoch_seed(self.seed, epoch, self.split.rank))
        return torch.randperm(len(self.split), generator=g, device=dev)[: self.rows()]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        x, y, B, n = self.split.x, self.split.y, self.batch_size, self.rows()
        if not self.train:
            for i in range(0, n, B):
                yield x[i:i + B], y[i:i + B]
            return
        perm = self.order(self.epoch_fn())
        for i in range(0, n, B):
            idx = perm[i:i + B]
            yield x.index_select(0, idx), y.index_select(0, idx)
