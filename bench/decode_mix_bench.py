"""RoBlock's native decode-mix kernel on its own: forward + backward of one block's router tail, per contender.

Contenders, on Criteo-size activations (F = 39 fields, D = 10, K = 4, batch 2048, one thread), at M = H sets/heads:

* ``gates in kernel``: ``decode_mix_query`` (query, logits, softmax, components and mixing in the kernel), then the
  block's residual ``x + alpha E'`` as a separate one-pass Function (``_ScaledResidual``);
* ``gates + residual in kernel``: the same kernel writing ``x + alpha E'`` itself (``residual=``);
* ``torch gates``: the query, logits and softmax in torch operations, then ``decode_mix`` (components and mixing in the
  kernel), then the residual.

Prints the median time of each and its ratio to ``gates in kernel`` measured in the same run (contenders alternate).

    .venv/bin/python bench/decode_mix_bench.py [--sets 1 2 4] [--reps 15]
"""

from __future__ import annotations

import argparse
import time

import torch

from recscale.models import decode_mix as dm
from recscale.models.roblock import _ScaledResidual


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    if not dm.available():
        raise SystemExit(f"the native kernel is unavailable: {dm.unavailable_reason()}")
    torch.set_num_threads(1)
    F, D, K, B = 39, 10, 4, 2048
    print(f"cpu, 1 thread, F = {F}, D = {D}, K = {K}, batch {B}; forward + backward of one block's tail, "
          f"median of {args.reps}")
    for M in args.sets:
        H = M
        g = torch.Generator().manual_seed(0)
        ins = [torch.randn(M, F, D, B, generator=g), 0.3 * torch.randn(M, F, D, D, generator=g),
               torch.randn(M, F, D, generator=g), torch.randn(F, D, H * M * K, generator=g),
               torch.randn(F, H * M * K, generator=g), torch.randn(M, F, D, K * D, generator=g),
               torch.randn(M, F, K * D, generator=g)]
        ins = [t.requires_grad_() for t in ins]
        xres = torch.randn(H, F, D, B, generator=g, requires_grad=True)
        alpha = torch.tensor(0.7, requires_grad=True)

        def torch_gates():
            x, T, t0, U, c, A, a = ins
            ybar = (torch.einsum("mfde,mfdb->mfeb", T, x) + t0[..., None]).mean(0)
            logits = torch.baddbmm(c[..., None], U.transpose(1, 2), ybar)
            gates = torch.softmax(logits.view(F, H, M * K, B), 2)
            return _ScaledResidual.apply(xres, alpha, dm.decode_mix(x, A, a, gates).transpose(0, 1))

        contenders = {
            "gates in kernel": lambda: _ScaledResidual.apply(xres, alpha, dm.decode_mix_query(*ins)),
            "gates + residual in kernel": lambda: dm.decode_mix_query(*ins, residual=(xres, alpha)),
            "torch gates": torch_gates,
        }
        times = {k: [] for k in contenders}
        for _ in range(args.reps):
            for name, fn in contenders.items():
                t = time.perf_counter()
                out = fn()
                torch.autograd.grad(out, [*ins, xres, alpha], torch.ones_like(out))
                times[name].append(time.perf_counter() - t)
        med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
        base = med["gates in kernel"]
        for name, ms in med.items():
            print(f"M = H = {M}  {name:<28} {ms:7.2f} ms  x {ms / base:.2f}")


if __name__ == "__main__":
    main()
