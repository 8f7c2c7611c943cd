"""pytest-benchmark: the fused ops, providers x modes x shapes.

Providers: ``reference`` (fasthash.reference, naive torch: materialises 2B x 2B), ``blocked``
(the CPU path of fasthash.functional) and ``triton`` (CUDA only; skipped elsewhere). Modes:
forward and forward + backward. Sizes stay small so `make bench` is short on a 2-core machine;
the large-N GPU comparison (eager / torch.compile / Triton) is bench/gpu_check.py and the CPU
memory comparison bench/loss_cpu.py.
"""

import pytest
import torch

import fasthash
from fasthash import reference as ref

CUDA = torch.cuda.is_available()
PROVIDERS = ["reference", "blocked"] + (["triton"] if CUDA else [])


def _loss_inputs(bsz, length, device):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(bsz, length, generator=g).to(device).requires_grad_()
    t = torch.randn(bsz, length, generator=g).sign().to(device)
    t2 = torch.randn(bsz, length, generator=g).sign().to(device)
    table = (torch.rand(10, length, generator=g) > 0.3).float().to(device)
    c = torch.randint(0, 10, (bsz,), generator=g).to(device)
    return s, t, t2, dict(mask_table=table, cluster_ids=c, aug_cluster_ids=c)


def _device(provider):
    return "cuda" if provider == "triton" else "cpu"


def _sync(provider):
    if provider == "triton":
        torch.cuda.synchronize()


@pytest.mark.parametrize("n_rows,mode", [(2048, "fwd"), (2048, "fwd+bwd"), (4096, "fwd+bwd")])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_brcd_loss(benchmark, provider, n_rows, mode):
    s, t, t2, kw = _loss_inputs(n_rows // 2, 64, _device(provider))
    fn = ref.brcd_loss_ref if provider == "reference" else fasthash.brcd_contrastive_loss

    def run():
        s.grad = None
        loss = fn(s, t, t2, **kw)
        if mode == "fwd+bwd":
            loss.backward()
        _sync(provider)
        return loss

    benchmark.group = f"brcd loss 2B={n_rows} L=64 {mode}"
    benchmark.extra_info.update(provider=provider, n_rows=n_rows, bits=64, mode=mode)
    loss = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    want = ref.brcd_loss_ref(s.detach().double().cpu(), t.double().cpu(), t2.double().cpu(),
                             **{k: v.cpu().double() if v.is_floating_point() else v.cpu()
                                for k, v in kw.items()})
    assert abs(loss.item() - want.item()) < 1e-3 * max(1.0, abs(want.item()))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_nt_xent(benchmark, provider):
    dev = _device(provider)
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(1024, 64, generator=g).to(dev).requires_grad_()
    z2 = torch.randn(1024, 64, generator=g).to(dev).requires_grad_()
    fn = ref.nt_xent_ref if provider == "reference" else fasthash.nt_xent_loss

    def run():
        z1.grad = z2.grad = None
        fn(z1, z2, 0.3).backward()
        _sync(provider)

    benchmark.group = "nt-xent 2B=2048 L=64 fwd+bwd"
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("length", [64])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_masked_similarity(benchmark, provider, length):
    dev = _device(provider)
    g = torch.Generator().manual_seed(2)
    n = 2048
    x = torch.randn(n, length, generator=g).to(dev)
    y = torch.randn(n, length, generator=g).to(dev)
    table = (torch.rand(8, length, generator=g) > 0.3).float().to(dev)
    ids = torch.randint(0, 8, (n,), generator=g).to(dev)
    if provider == "reference":
        mx = table[ids]

        def run():
            return ref.masked_similarity_ref(x, y, mx, mx)
    else:

        def run():
            out = fasthash.masked_hamming_similarity(x, y, (table, ids), (table, ids))
            _sync(provider)
            return out

    benchmark.group = f"masked similarity {n}x{n} L={length} fwd"
    benchmark.extra_info["bytes_written"] = n * n * 4
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
