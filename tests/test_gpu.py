"""GPU checks (marker `gpu`, excluded by default; `pytest -m gpu`, run by bench/gpu_check.sh). Each test skips
without CUDA. A short fit on the bundled sample in bf16 and fp16 mixed precision and with the device cache, the
out-of-memory message, and the diagnostics on CUDA against the CPU's float64 values."""

import math
import os

import pytest
import torch
from conftest import ROOT, run_cli

from recscale.models import backbones as bb
from recscale.models.module import CTRModel

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/gpu_check.sh)")]


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)


def _fit(criteo_dir, *extra):
    from recscale.train import cli_main

    return cli_main(["fit", f"--config={ROOT / 'configs/model/dcnv2.yaml'}",
                     f"--config={ROOT / 'configs/scale/me2x.yaml'}",
                     f"--data.data_dir={criteo_dir}", "--data.batch_size=512", "--data.num_workers=0",
                     "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.max_epochs=2",
                     "--trainer.enable_progress_bar=false", "--diagnostics.sample_rows=500", *extra])


def _logged(cli) -> dict[str, float]:
    """The run's last logged value of each metric. After `fit`, the test pass with the best checkpoint has replaced
    `trainer.callback_metrics` (only test/* is left there), so validation metrics are read from the MLflow run."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(cli.trainer.logger.run_id).data.metrics


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_fit_on_cuda(criteo_dir, store, precision):
    """DCNv2 ME 2x (fused cross layers under autocast, sparse table gradient, fused Adam; fp16 with Lightning's
    gradient scaler) trains on the GPU: finite float32 validation and test metrics, the weights stay float32 (mixed
    precision casts per op), and the diagnostics ran at every validation end."""
    cli = _fit(criteo_dir, f"--trainer.precision={precision}")
    assert cli.trainer.global_step == 2 * math.ceil(8000 / 512)
    assert cli.trainer.callback_metrics["test/auc"].dtype == torch.float32  # metrics stay float32 under autocast
    m = _logged(cli)
    for k in ("val/auc", "val/logloss", "test/auc", "test/logloss"):
        assert math.isfinite(m[k]), (k, m[k])
    assert 0.5 < m["val/auc"] < 1.0  # it learnt something on the sample
    assert cli.trainer.strategy.root_device.type == "cuda"
    assert all(p.dtype == torch.float32 for p in cli.model.parameters())
    assert cli.trainer.callbacks and any(getattr(c, "seconds", None) for c in cli.trainer.callbacks)


def test_device_cache_fit_on_cuda(criteo_dir, store):
    """bf16 + `--data.device_cache true`: the splits live on the GPU, the fit makes the stream's number of steps."""
    cli = _fit(criteo_dir, "--trainer.precision=bf16-mixed", "--data.device_cache=true")
    assert cli.trainer.global_step == 2 * math.ceil(8000 / 512)  # the same count as the streaming loader
    assert math.isfinite(_logged(cli)["val/auc"])
    loader = cli.datamodule.train_dataloader()
    assert loader.split.x.is_cuda and loader.split.y.is_cuda and len(loader.split) == 8000
    x, y = next(iter(loader))
    assert x.is_cuda and x.dtype == torch.int32 and y.dtype == torch.float32


def test_device_cache_free_memory_probe_on_cuda():
    from recscale.data.datamodule import free_bytes

    free, total = torch.cuda.mem_get_info()
    got = free_bytes(torch.device("cuda", torch.cuda.current_device()))
    assert 0 < got <= total and abs(got - free) < 2**30  # the probe is CUDA's free memory (others may allocate)


def test_out_of_memory_message(criteo_dir, tmp_path):
    """A real CUDA OOM: DNN ME 4000x at batch 8000 needs (4000, 8000, 390) float32 activations several times over
    (> 150 GB, more than an H100 or H200 holds). `recscale fit` stops with exit code 3 and one line naming the batch
    size, the scale and the fixes, instead of a traceback."""
    p = run_cli("fit", f"--config={ROOT / 'configs/model/dnn.yaml'}", f"--data.data_dir={criteo_dir}",
                "--data.batch_size=8000", "--data.num_workers=0", "--model.mode=ME", "--model.scale=4000",
                "--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.max_epochs=1",
                "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
                check=False, env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
                timeout=600)
    assert p.returncode == 3, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("recscale: error: out of GPU memory with data.batch_size=8000, model.mode=ME, "
                           "model.scale=4000"), last
    assert "lower --data.batch_size" in last


def test_diagnostics_on_cuda_equal_cpu_float64(criteo_dir):
    """compute_report with the model on the GPU (Grams and RankMe products on the device, float64) gives the CPU's
    values to 1e-6 relative. The weights and the sample are the same; the only float32 step is the backbone's
    forward/backward for the gradient RankMe (TF32 off, so both sides round at float32 eps ~ 1e-7)."""
    from recscale.data.datamodule import CTRDataModule, sample_split
    from recscale.diagnostics.compute import Options, compute_report

    dm = CTRDataModule(str(criteo_dir), num_workers=0)
    torch.manual_seed(0)
    model = CTRModel(lambda f, d, m: bb.DCNv2(f, d, m), field_dims=dm.field_dims, mode="ME", scale=3,
                     embedding_init_std=0.1)
    x, y = sample_split(dm.units("valid"), dm.fields, 1000)
    sample = (torch.from_numpy(x), torch.from_numpy(y))
    opts = Options(figures=False, gradient_mode="eval")  # train mode draws dropout masks from each device's own RNG
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        cpu = compute_report(model, sample, opts, dm.fields).metrics
        gpu = compute_report(model.cuda(), sample, opts, dm.fields).metrics
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert cpu.keys() == gpu.keys() and "rankme/gradients" in cpu and "sub_ia/correlation_factor" in cpu
    bad = {k: (cpu[k], gpu[k]) for k in cpu if not k.startswith("seconds")  # timings differ, of course
           and not abs(cpu[k] - gpu[k]) <= 1e-6 * max(abs(cpu[k]), abs(gpu[k]), 1e-12)}
    assert not bad, bad


def test_nonfinite_loss_stops_on_cuda_without_a_per_step_sync(criteo_dir, store, capsys):
    """On the GPU the non-finite check is read every CTRModel.NONFINITE_CHECK_EVERY steps and at each epoch's end
    (no host synchronisation per step): an exploding lr still stops the fit (exit code 3) naming the first bad step."""
    with pytest.raises(SystemExit) as e:
        _fit(criteo_dir, "--model.lr=1e30")
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "non-finite training loss" in err and "global step" in err, err[-2000:]
