"""CTRModel: M embedding sets of size D plus a backbone; owns loss, metrics and optimizer.

Scale (ICML 2024 App. C.2): at scale k, SE uses one set of size ``k * base_dim``; ME uses ``k`` sets of size
``base_dim`` (base 10; 50 for NFwFM). ``k = 1`` is the same model in both modes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC

from recscale.models.backbones import ConfigError


class SetEmbedding(nn.Module):
    """All fields' tables in one ``(sum_i |V_i|, M * D)`` matrix: one lookup gives every set of every field.

    Set m of field i is ``weight[offset_i : offset_i + |V_i|, m*D : (m+1)*D]``. Initialisation (``init``):
      - ``"xavier_uniform"`` (default; the ICML 2024 reference ``FeaturesEmbedding``: ``xavier_uniform_`` over each
        set's whole ``(sum_i |V_i|, D)`` table): U(+-sqrt(6 / (sum_i |V_i| + D))), std about 1.36e-3 on Criteo at D = 10;
      - ``"normal"``: N(0, init_std^2), FuxiCTR's default ``normal_(std=1e-4)`` (the SIGIR 2026 recipe).
    """

    def __init__(self, field_dims: list[int], dim: int, num_sets: int, init_std: float = 1e-4,
                 sparse_grad: bool = True, init: Literal["xavier_uniform", "normal"] = "xavier_uniform"):
        super().__init__()
        self.field_dims, self.dim, self.num_sets = list(field_dims), dim, num_sets
        self.weight = nn.Parameter(torch.empty(sum(field_dims), num_sets * dim))
        if init == "xavier_uniform":
            bound = math.sqrt(6.0 / (sum(field_dims) + dim))  # each set's table: fan_in D, fan_out sum|V|
            nn.init.uniform_(self.weight, -bound, bound)
        elif init == "normal":
            nn.init.normal_(self.weight, 0.0, init_std)
        else:
            raise ConfigError(f"model.embedding_init must be 'xavier_uniform' or 'normal', got {init!r}")
        offsets = torch.tensor([0, *field_dims[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.sparse_grad = sparse_grad
        self._grad_buffer: Tensor | None = None
        self._touched: Tensor | None = None

    def forward(self, ids: Tensor) -> Tensor:  # (B, F) int -> (M, B, F, D)
        B, Fn = ids.shape
        sparse = self.sparse_grad and self.training and torch.is_grad_enabled()
        flat = F.embedding(ids + self.offsets, self.weight, sparse=sparse)  # (B, F, M*D)
        return flat.view(B, Fn, self.num_sets, self.dim).permute(2, 0, 1, 3)

    def densify_grad(self) -> None:
        """Turn a sparse table gradient into the dense gradient the optimizer expects, without a fresh zero-filled
        (sum|V|, M*D) tensor every step: one persistent buffer, of which only the rows touched by the previous step
        are zeroed. The optimizer then sees exactly the dense gradient it would have seen (weight decay still updates
        every row). Call before ``optimizer.step()``."""
        g = self.weight.grad
        if g is None or not g.is_sparse:
            return
        if self._grad_buffer is None or self._grad_buffer.shape != self.weight.shape:
            self._grad_buffer = torch.zeros_like(self.weight)
        elif self._touched is not None:
            self._grad_buffer.index_fill_(0, self._touched, 0.0)
        idx = g._indices()[0]
        self._grad_buffer.index_add_(0, idx, g._values())
        self._touched = idx
        self.weight.grad = self._grad_buffer

    def table(self, field: int, set_index: int | None = None) -> Tensor:
        """A field's table: ``(|V_i|, D)`` for one set, or ``(|V_i|, M*D)`` (sets concatenated) when set is None."""
        lo = int(self.offsets[field])
        rows = self.weight[lo : lo + self.field_dims[field]]
        if set_index is None:
            return rows
        return rows[:, set_index * self.dim : (set_index + 1) * self.dim]


class CTRModel(L.LightningModule):
    """A CTR model: ``logit = backbone(embeddings(ids))``, trained with BCE-with-logits and Adam.

    Args:
        backbone: a backbone class from recscale.models.backbones (``class_path`` + hyperparameters in YAML), called
            as ``backbone(num_fields, embed_dim, num_sets)``.
        field_dims: vocabulary size of each field including OOV; linked from the data spec, never typed.
        base_dim: embedding size at scale 1 (10; 50 for NFwFM).
        mode: ``SE`` (one set of size ``scale * base_dim``) or ``ME`` (``scale`` sets of size ``base_dim``).
        scale: model-size factor (1, 2, 3, 4, 10 in the papers).
        lr, weight_decay: Adam, weight decay (L2 added to the gradient) on all parameters (ICML 2024 App. C.2).
        embedding_init: ``"xavier_uniform"`` (default, the ICML 2024 reference) or ``"normal"`` (FuxiCTR's, the SIGIR 2026
            recipe); see ``SetEmbedding``.
        embedding_init_std: std of the ``"normal"`` initialisation (FuxiCTR: 1e-4).
        embedding_l2: FuxiCTR's ``embedding_regularizer``: ``embedding_l2 / 2 * ||E||_F^2`` over the whole embedding
            table (every row, not only the rows looked up in the batch) added to the training loss, as FuxiCTR's
            ``regularization_loss`` does for its ``nn.Embedding`` weights (SIGIR 2026 recipe: 1e-5 Criteo_x1). 0: off
            (ICML 2024 uses Adam's weight decay on all parameters instead).
        recipe: a label of the training recipe the config follows (``icml24``, or ``sigir26`` set by
            configs/recipe/); saved with the hyperparameters and written as the MLflow tag ``recipe``.
        fused_adam: use torch's fused Adam kernel (the same update in one pass over each tensor; for 1M-row tables the
            optimizer step dominates a training step on the CPU). ``False`` gives torch's default implementation.
        sparse_embedding_grad: build the table's gradient from the looked-up rows only (see
            ``SetEmbedding.densify_grad``); the same update, without zero-filling the whole table every step.
            Switched off automatically under multi-process training (DDP reduces dense gradients).
        compile: run the backbone through ``torch.compile`` (``nn.Module.compile``: parameter names, checkpoints and
            diagnostics are unchanged; the first steps pay the compilation). Needs a C++ compiler on the CPU, Triton
            on GPUs. Logits are the eager ones to float rounding (tests/test_precision.py).

    Logits are returned in float32 whatever the precision (under ``bf16-mixed`` the head's last product is bf16), so
    the loss, AUC and logloss are float32 computations in every precision.
    """

    def __init__(self, backbone: Callable[[int, int, int], nn.Module], field_dims: list[int] | None = None,
                 base_dim: int = 10, mode: Literal["SE", "ME"] = "SE", scale: int = 1, lr: float = 1e-3,
                 weight_decay: float = 1e-6, embedding_init_std: float = 1e-4, fused_adam: bool = True,
                 sparse_embedding_grad: bool = True,
                 embedding_init: Literal["xavier_uniform", "normal"] = "xavier_uniform", embedding_l2: float = 0.0,
                 recipe: str = "icml24", compile: bool = False):
        super().__init__()
        if not field_dims:
            raise ConfigError("model.field_dims is empty: it is linked from the data spec (data.data_dir); "
                              "build CTRModel with the field_dims of a CTRDataModule")
        if scale < 1:
            raise ConfigError(f"model.scale must be a positive integer, got {scale}")
        if base_dim < 1:
            raise ConfigError(f"model.base_dim must be a positive integer, got {base_dim}")
        self.save_hyperparameters(logger=False)
        self.num_sets = scale if mode == "ME" else 1
        self.embed_dim = base_dim if mode == "ME" else base_dim * scale
        if embedding_l2 < 0:
            raise ConfigError(f"model.embedding_l2 must be >= 0, got {embedding_l2}")
        self.embedding = SetEmbedding(field_dims, self.embed_dim, self.num_sets, embedding_init_std,
                                      sparse_embedding_grad, embedding_init)
        self.backbone = backbone(len(field_dims), self.embed_dim, self.num_sets)
        if compile:
            self.backbone.compile()
        # first-order term sum_i w_{x_i} for backbones that ask for it (FFM): one scalar per id, nn.Embedding's N(0, 1)
        self.first_order = None
        if getattr(self.backbone, "first_order", False):
            self.first_order = nn.Parameter(torch.randn(sum(field_dims), 1))
        self._nonfinite: tuple[Tensor, Tensor] | None = None  # accelerators: see NONFINITE_CHECK_EVERY
        self.metrics = nn.ModuleDict({
            f"{stage}_{name}": metric
            for stage in ("val", "test")
            for name, metric in (("auc", BinaryAUROC()), ("logloss", MeanMetric()))
        })

    # ------------------------------------------------------------------ sizes
    def parameter_counts(self) -> dict[str, int]:
        emb = self.embedding.weight.numel() + (self.first_order.numel() if self.first_order is not None else 0)
        total = sum(p.numel() for p in self.parameters())
        return {"embedding": emb, "dense": total - emb}

    # ------------------------------------------------------------------ steps
    def forward(self, ids: Tensor) -> Tensor:
        logits = self.backbone(self.embedding(ids)).float()  # float32 logits under mixed precision too (no-op in fp32)
        if self.first_order is not None:
            logits = logits + F.embedding(ids + self.embedding.offsets, self.first_order).sum((1, 2))
        return logits

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """BCE with logits, plus the backbone's ``regularization()`` if it has one, plus the embedding L2 term."""
        loss = F.binary_cross_entropy_with_logits(logits, y)
        reg = getattr(self.backbone, "regularization", None)
        if reg is not None:
            loss = loss + reg()
        if self.hparams.get("embedding_l2", 0.0) > 0:
            loss = loss + 0.5 * self.hparams.embedding_l2 * self.embedding.weight.pow(2).sum()
        return loss

    # On an accelerator the non-finite check must not read the loss every step: that blocks the host until the
    # step's forward has run, so it cannot queue the next step's work (at batch 2048 the GPU then waits on the host).
    # There, the first non-finite step and its loss are recorded on the device and read every this many steps and at
    # the end of every training epoch, before the epoch's checkpoint is written.
    NONFINITE_CHECK_EVERY = 100

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self(x), y)
        if loss.device.type == "cpu":
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss.item()} at global step {self.global_step}")
        else:
            self._record_nonfinite(loss.detach())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        aux = getattr(self.backbone, "aux_metrics", None)  # extra training terms (e.g. RoBlock's HSIC) as train/<name>
        for name, value in (aux() if aux is not None else {}).items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=len(y))
        return loss

    def _record_nonfinite(self, loss: Tensor) -> None:
        """Device-side: (first non-finite global step or -1, its loss), kept without a host synchronisation."""
        if self._nonfinite is None or self._nonfinite[0].device != loss.device:
            self._nonfinite = (torch.full((), -1, dtype=torch.long, device=loss.device),
                               torch.zeros((), dtype=torch.float32, device=loss.device))
        first, value = self._nonfinite
        new = ~torch.isfinite(loss) & (first < 0)
        first.copy_(torch.where(new, torch.full_like(first, self.global_step), first))
        value.copy_(torch.where(new, loss.float(), value))

    def _check_nonfinite(self) -> None:
        if self._nonfinite is None:
            return
        first, value = self._nonfinite
        step = int(first.item())  # the one host read
        if step >= 0:
            self._nonfinite = None
            raise FloatingPointError(f"non-finite training loss {value.item()} at global step {step}")

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # module hooks run after the callbacks' of the same name, and every callback's on_train_epoch_end (where
        # checkpoints are written) comes after the last batch's on_train_batch_end
        last = self.trainer is not None and batch_idx + 1 >= self.trainer.num_training_batches
        if last or (self.global_step % self.NONFINITE_CHECK_EVERY == 0):
            self._check_nonfinite()

    def _eval_step(self, batch, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.metrics[f"{stage}_auc"].update(logits, y.long())
        self.metrics[f"{stage}_logloss"].update(F.binary_cross_entropy_with_logits(logits, y, reduction="none"))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return torch.sigmoid(self(batch[0]))

    def _eval_epoch_end(self, stage: str) -> None:
        for name in ("auc", "logloss"):
            m = self.metrics[f"{stage}_{name}"]
            self.log(f"{stage}/{name}", m.compute(), prog_bar=name == "auc", sync_dist=False)
            m.reset()

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            self.embedding.sparse_grad = False  # DDP all-reduces dense gradient buckets

    def on_before_optimizer_step(self, optimizer) -> None:
        self.embedding.densify_grad()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                fused=self.hparams.fused_adam or None)
