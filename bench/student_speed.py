"""What makes the demo's student training cheap (issue 12, "Speed, so that this fits").

Three measurements, all in one process on the CPU, each against its baseline measured in the
same run (repetitions interleaved, medians reported):

1. **paper student, one optimiser step** (frozen ImageNet ``tf_efficientnet_lite0`` + MLP head
   of 512, 48 px input from 28x28 uint8 views, 32 bits, 2 views x B images, the BRCD objective:
   ``cibhash_loss`` + ``METHODS["brcd"].kd_loss`` on random ±1 teacher codes, cluster ids,
   centroids and mask table, Adam with the trainer's gradient clipping): (a) the full model
   forward on the images every step (a frozen-backbone student without a feature cache) against
   (b) the head on cached float16 backbone features (``HashModel.head_forward``, what
   ``brcd.stages.distill`` runs for a frozen student);
2. **per-run costs paid once instead**: the frozen Lite0 feature extraction rate (measured on
   ``--extract-images`` images, extrapolated to the bank of ``--bank-images`` x (``--views`` + 1)
   views + the validation queries, and to the 15,000 test views), against encoding those test
   views (and the validations) with the full model in every run, and the head alone on cached
   features (measured on all 15,000);
3. **tiny-cnn student, one step** (28 px, channels-last, MLP head of 256, the same loss): the
   time split into the network (convolutions' forward + backward), the loss (forward +
   backward on leaf logits) and the optimiser, cross-checked by ``torch.profiler`` (share of
   self CPU time in convolution ops); and 3 seeds trained as ONE grouped model (grouped
   convolutions, outputs checked equal to the 3 models) or through ``torch.func.vmap`` over
   ``functional_call`` against 3 sequential steps.

Usage::

    .venv/bin/python bench/student_speed.py --quick   # smoke run, < 20 s
    .venv/bin/python bench/student_speed.py           # ~1.5 minutes on 2 cores
    .venv/bin/python bench/student_speed.py --threads 1,2   # + 2 threads (only on idle cores:
                                                            # OpenMP stalls when they are busy)

Writes bench/results/student_speed.json (``--out``; ``--quick`` writes nothing unless ``--out``
is given) and prints a table. The JSON records the load average before and after: figures from
a loaded machine are marked ``loaded``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchenv import environment  # noqa: E402

import fasthash  # noqa: E402
from brcd import data as D  # noqa: E402
from brcd.config import DistillConfig  # noqa: E402
from brcd.losses import METHODS, KDBatch, cibhash_loss  # noqa: E402
from brcd.models import HashModel, HashOutput, create_model  # noqa: E402
from brcd.stages.encode import encode_views, head_codes  # noqa: E402
from brcd.stages.runtime import cpu_has_bf16, free_cores  # noqa: E402

RESULT = ROOT / "bench" / "results" / "student_speed.json"
PAPER = {"name": "tf_efficientnet_lite0", "pretrained": True, "freeze_backbone": True,
         "head": "mlp", "hidden": 512}


# ---- environment ------------------------------------------------------------------------------
def _env() -> dict:
    return environment(cpu_has_bf16=cpu_has_bf16(), free_cores_at_start=round(free_cores(), 2))


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def _interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int
                 ) -> dict[str, dict[str, float]]:
    """Median and min ms of each ``fn`` over ``reps`` rounds, run in turn within each round (so
    a change of the machine's load hits every variant alike)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: {"median_ms": _median_ms(v), "min_ms": 1e3 * min(v), "reps": len(v)}
            for k, v in times.items()}


# ---- the step ---------------------------------------------------------------------------------
class _Teacher:
    """Random stand-ins for what a BRCD step reads from the teacher checkpoint: ±1 codes of
    both views, each image's cluster id, the centroids and the {0,1} mask table."""

    def __init__(self, batch: int, bits: int, clusters: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.t1 = torch.randint(0, 2, (batch, bits), generator=g).float() * 2 - 1
        self.t2 = torch.where(torch.rand(batch, bits, generator=g) < 0.1, -self.t1, self.t1)
        self.ids = torch.randint(0, clusters, (batch,), generator=g)
        self.centroids = torch.randint(0, 2, (clusters, bits), generator=g).float() * 2 - 1
        self.table = (torch.rand(clusters, bits, generator=g) < 0.7).float()


def _loss(s1: HashOutput, s2: HashOutput, t: _Teacher, opts: DistillConfig) -> torch.Tensor:
    """``L_own + weight * L_BRCD``, as ``brcd.stages.distill._step_fn`` composes it."""
    method = METHODS["brcd"]
    loss, _ = cibhash_loss(s1, s2, 0.3, 0.001)
    kb = KDBatch(s1=s1, s2=s2, t1=t.t1, t2=t.t2, cluster_ids=t.ids, mask_table=t.table,
                 centroids=t.centroids, temperature=0.3, options=opts)
    return loss + method.weight * method.kd_loss(kb)


class _Trainable:
    """The trainer's update for ``params``: zero_grad, backward, clip at 5, Adam(1e-3)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.opt = torch.optim.Adam(params, lr=1e-3)

    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 5.0)
        self.opt.step()


def _trainable(model: nn.Module) -> _Trainable:
    return _Trainable([p for p in model.parameters() if p.requires_grad])


def _views(n: int, size: int, seed: int) -> torch.Tensor:
    """Random uint8 views ``[n, 3, size, size]`` (grey images expanded to 3 channels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8
                         ).expand(-1, 3, -1, -1).contiguous()


def _leaf_output(logits: torch.Tensor) -> HashOutput:
    """A HashOutput built from logits as HashModel.head_forward does."""
    probs = torch.sigmoid(logits)
    return HashOutput(logits, probs, fasthash.sign_ste(probs - 0.5))


# ---- 1. the paper student's step ----------------------------------------------------------------
def paper_step(args, model: HashModel, opts: DistillConfig) -> dict:
    """ms per step: (a) the full model on the images vs (b) the head on cached features."""
    b, size = args.batch, args.paper_size
    t = _Teacher(b, args.bits, args.clusters, 1)
    x1, x2 = _views(b, args.view_size, 2), _views(b, args.view_size, 3)
    with torch.no_grad():
        f1 = model.features(D.prepare_batch(x1, size, None, True)).half()
        f2 = model.features(D.prepare_batch(x2, size, None, True)).half()
    model.train()
    tr = _trainable(model)

    def full():
        s1 = model(D.prepare_batch(x1, size, None, True))
        s2 = model(D.prepare_batch(x2, size, None, True))
        tr.update(_loss(s1, s2, t, opts))

    def head():
        tr.update(_loss(model.head_forward(f1), model.head_forward(f2), t, opts))

    with torch.no_grad():
        l1, l2 = model.head_forward(f1).logits, model.head_forward(f2).logits

    def loss_alone():  # the floor of (b): the loss's forward + backward on leaf logits
        a, c = l1.clone().requires_grad_(), l2.clone().requires_grad_()
        _loss(_leaf_output(a), _leaf_output(c), t, opts).backward()

    res = _interleaved({"full_model": full, "head_on_features": head}, args.reps, args.warmup)
    # the head step is ~10x shorter: more rounds of it alone for a steadier median
    res.update(_interleaved({"head_on_features": head, "loss_alone": loss_alone},
                            args.reps * 3, args.warmup))
    res["ratio_full_over_head"] = (res["full_model"]["median_ms"]
                                   / res["head_on_features"]["median_ms"])
    return res


# ---- 2. per-run costs ---------------------------------------------------------------------------
def per_run(args, model: HashModel, step: dict) -> dict:
    """Extraction rate of frozen Lite0 features; the demo's once-only costs against per-run
    encoding with the full model, and the head alone on cached features."""
    size, n = args.paper_size, args.extract_images
    views = _views(n, args.view_size, 4)
    model.eval()

    def feats():
        encode_views(model, views, size, batch=256, features=True)

    def codes():
        encode_views(model, views, size, batch=256)

    r = _interleaved({"features": feats, "codes": codes}, max(1, args.reps // 4), 1)
    feat_rate = n / (r["features"]["median_ms"] / 1e3)
    code_rate = n / (r["codes"]["median_ms"] / 1e3)
    n_eval = args.queries + args.database
    cached = torch.randn(n_eval, model.num_features).half()
    h = _interleaved({"h": lambda: head_codes(model, cached, torch.device("cpu"))},
                     max(2, args.reps // 2), 1)["h"]
    head_s = h["median_ms"] / 1e3
    bank = args.bank_images * (args.views + 1) + args.val
    steps = args.epochs * max(1, args.bank_images // args.batch)
    vals = max(1, args.epochs // max(1, args.epochs // 4))  # eval_every = epochs // 4
    val_imgs = vals * (args.val + args.bank_images)
    full_ms, head_ms = (step[k]["median_ms"] for k in ("full_model", "head_on_features"))
    return {
        "measured_on_images": n, "batch": 256,
        "lite0_feature_images_per_s": feat_rate, "lite0_full_model_images_per_s": code_rate,
        "once": {
            "bank_views": bank, "bank_extraction_s_est": bank / feat_rate,
            "eval_views": n_eval, "eval_extraction_s_est": n_eval / feat_rate,
            "note": "extrapolated from the measured rate",
        },
        "per_run_eval_encoding": {
            "full_model_s_est": n_eval / code_rate, "head_on_cached_s": head_s,
            "ratio_full_over_head": (n_eval / code_rate) / head_s,
        },
        "per_run_training": {
            "epochs": args.epochs, "steps": steps,
            "full_model_s_est": steps * full_ms / 1e3, "head_on_features_s_est":
                steps * head_ms / 1e3,
            "validations": vals, "validation_images": val_imgs,
            "validation_full_model_s_est": val_imgs / code_rate,
            "validation_head_s_est": val_imgs / n_eval * head_s,
        },
    }


# ---- 3. tiny-cnn: where the step's time goes, and 3 seeds at once ------------------------------
def _tiny(bits: int, seed: int) -> HashModel:
    torch.manual_seed(seed)
    return create_model("tiny-cnn", bits, head="mlp", hidden=256).to(
        memory_format=torch.channels_last).train()


def tiny_pieces(args, opts: DistillConfig) -> dict:
    """One tiny-cnn step timed piece by piece, the loss alone on leaf logits, and the
    profiler's share of self CPU time in convolution / batch-norm / ReLU ops."""
    b, size = args.batch, args.tiny_size
    model, t = _tiny(args.bits, 0), _Teacher(b, args.bits, args.clusters, 5)
    tr = _trainable(model)
    x1, x2 = _views(b, size, 6), _views(b, size, 7)
    pieces: dict[str, list[float]] = {k: [] for k in ("network_forward", "loss_forward",
                                                      "backward", "clip_and_adam", "step")}

    def step(record: bool):
        t0 = time.perf_counter()
        s1 = model(D.prepare_batch(x1, size, None, True))
        s2 = model(D.prepare_batch(x2, size, None, True))
        t1 = time.perf_counter()
        loss = _loss(s1, s2, t, opts)
        t2 = time.perf_counter()
        tr.opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(tr.params, 5.0)
        tr.opt.step()
        t4 = time.perf_counter()
        if record:
            for k, v in zip(pieces, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                pieces[k].append(v)
        return s1, s2

    s1, s2 = step(False)
    l1, l2 = s1.logits.detach(), s2.logits.detach()

    def loss_alone():
        a, c = l1.clone().requires_grad_(), l2.clone().requires_grad_()
        _loss(_leaf_output(a), _leaf_output(c), t, opts).backward()

    for _ in range(args.warmup):
        step(False)
        loss_alone()
    loss_t = []
    for _ in range(args.reps * 2):
        step(True)
        t0 = time.perf_counter()
        loss_alone()
        loss_t.append(time.perf_counter() - t0)
    med = {k: _median_ms(v) for k, v in pieces.items()}
    med["loss_forward_backward_on_leaf_logits"] = _median_ms(loss_t)
    total = med["step"]
    loss_fb, opt = med["loss_forward_backward_on_leaf_logits"], med["clip_and_adam"]
    shares = {"network": max(0.0, total - loss_fb - opt) / total, "loss": loss_fb / total,
              "optimiser": opt / total}
    return {"ms": med, "shares": shares, "profiler": _profile(step, max(3, args.reps // 2))}


def _profile(step: Callable[[bool], object], n: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step(False)
    total = conv = net = 0.0
    for e in prof.key_averages():
        s = e.self_cpu_time_total
        total += s
        name = e.key.lower()
        if "conv" in name:
            conv += s
        if any(w in name for w in ("conv", "batch_norm", "relu", "threshold", "adaptive_avg",
                                   "mean_backward", "mkldnn")):
            net += s
    return {"steps": n, "self_cpu_ms_per_step": total / 1e3 / n,
            "conv_share": conv / max(total, 1e-9),
            "conv_bn_relu_pool_share": net / max(total, 1e-9)}


class _GroupedTiny(nn.Module):
    """``g`` tiny-cnn backbones as one: convolutions with ``groups=g`` (model k's weights are
    group k), batch norm over the g x C channels (per channel, so per model), each model's own
    head. Input ``[B, 3g, H, W]`` (model k's batch in channels 3k..3k+2)."""

    def __init__(self, models: list[HashModel]) -> None:
        super().__init__()
        g = len(models)
        layers: list[nn.Module] = []
        for blocks in zip(*(m.backbone.features for m in models), strict=True):
            c0, bn0 = blocks[0][0], blocks[0][1]
            conv = nn.Conv2d(c0.in_channels * g, c0.out_channels * g, 3, c0.stride, 1,
                             groups=g, bias=False)
            bn = nn.BatchNorm2d(bn0.num_features * g)
            with torch.no_grad():
                conv.weight.copy_(torch.cat([blk[0].weight for blk in blocks]))
                bn.weight.copy_(torch.cat([blk[1].weight for blk in blocks]))
                bn.bias.copy_(torch.cat([blk[1].bias for blk in blocks]))
            layers += [conv, bn, nn.ReLU(inplace=True)]
        self.g, self.features = g, nn.Sequential(*layers)
        self.heads = nn.ModuleList([m.head for m in models])
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> list[HashOutput]:
        f = self.pool(self.features(x)).flatten(1).chunk(self.g, dim=1)
        return [_leaf_output(h(fk)) for h, fk in zip(self.heads, f, strict=True)]


def tiny_seeds(args, opts: DistillConfig) -> dict:
    """3 seeds (each its own batch, teacher rows and model): 3 sequential steps vs one grouped
    model vs vmap over functional_call; the same loss per model, summed."""
    g, b, size = args.group, args.batch, args.tiny_size
    models = [_tiny(args.bits, s) for s in range(g)]
    teachers = [_Teacher(b, args.bits, args.clusters, 10 + s) for s in range(g)]
    xs = [(_views(b, size, 20 + 2 * s), _views(b, size, 21 + 2 * s)) for s in range(g)]
    grouped = _GroupedTiny([_tiny(args.bits, s) for s in range(g)]).to(
        memory_format=torch.channels_last).train()
    with torch.no_grad():  # the grouped model computes the 3 models' outputs
        cat = torch.cat([D.prepare_batch(x1, size) for x1, _ in xs], 1)
        got = grouped(cat.contiguous(memory_format=torch.channels_last))
        want = [m(D.prepare_batch(x1, size, None, True)) for m, (x1, _) in zip(models, xs,
                                                                             strict=True)]
        diff = max(float((a.logits - w.logits).abs().max()) for a, w in zip(got, want,
                                                                            strict=True))
    trs = [_trainable(m) for m in models]
    tg = _trainable(grouped)

    def sequential():
        for m, tr, t, (x1, x2) in zip(models, trs, teachers, xs, strict=True):
            tr.update(_loss(m(D.prepare_batch(x1, size, None, True)),
                            m(D.prepare_batch(x2, size, None, True)), t, opts))

    def view(k: int) -> torch.Tensor:
        return torch.cat([D.prepare_batch(x[k], size) for x in xs], 1).contiguous(
            memory_format=torch.channels_last)

    def grouped_step():
        o1, o2 = grouped(view(0)), grouped(view(1))
        tg.update(sum(_loss(a, c, t, opts) for a, c, t in zip(o1, o2, teachers, strict=True)))

    fns = {"sequential": sequential, "grouped_conv": grouped_step}
    vm_err = None
    try:
        fns["vmap"] = _vmap_step(args, opts, teachers, xs)
        fns["vmap"]()
    except Exception as err:  # noqa: BLE001 - recorded, the other variants still run
        vm_err = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        fns.pop("vmap", None)
    res: dict = _interleaved(fns, args.reps, args.warmup)
    res["grouped_max_abs_logit_diff"] = diff
    res["seeds"] = g
    for k in ("grouped_conv", "vmap"):
        if k in res:
            res[f"{k}_over_sequential"] = res[k]["median_ms"] / res["sequential"]["median_ms"]
    if vm_err:
        res["vmap_error"] = vm_err
    return res


def _vmap_step(args, opts: DistillConfig, teachers: list[_Teacher], xs) -> Callable[[], None]:
    """3 stacked tiny-cnns through ``torch.func.vmap(functional_call)``: network forward and
    backward batched, the loss per model."""
    from torch.func import functional_call, stack_module_state, vmap

    size = args.tiny_size
    models = [_tiny(args.bits, s) for s in range(args.group)]
    params, buffers = stack_module_state(models)
    base = _tiny(args.bits, 0).to("meta")
    tr = _Trainable(list(params.values()))

    def logits(p, bu, x):
        return functional_call(base, (p, bu), (x,)).logits

    run = vmap(logits, in_dims=(0, 0, 0))
    # the channels-last pooling falls back to a slow as_strided_ rule: that is part of the cost
    warnings.filterwarnings("ignore", message=".*batching rule for aten::as_strided_")

    def step():
        o = [run(params, buffers, torch.stack([D.prepare_batch(x[k], size, None, True)
                                               for x in xs])) for k in (0, 1)]
        tr.update(sum(_loss(_leaf_output(o[0][i]), _leaf_output(o[1][i]), t, opts)
                      for i, t in enumerate(teachers)))
    return step


# ---- main ---------------------------------------------------------------------------------------
def _row(name: str, ms: float, base: float | None = None) -> str:
    ratio = f"{base / ms:8.2f}x" if base else ""
    return f"  {name:<46}{ms:10.2f} ms{ratio}"


def _print(res: dict) -> None:
    for th, r in res["paper_student_step"].items():
        print(f"paper student step (Lite0 48 px, 2x{res['config']['batch']} images, "
              f"{res['config']['bits']} bits), {th}:")
        full = r["full_model"]["median_ms"]
        print(_row("(a) full model on the images", full))
        print(_row("(b) head on cached features", r["head_on_features"]["median_ms"], full))
        print(_row("    of which the loss alone (fwd + bwd)", r["loss_alone"]["median_ms"]))
    p = res["per_run"]
    print(f"frozen Lite0 at 48 px, 1 thread: features {p['lite0_feature_images_per_s']:.0f} "
          f"img/s, full model {p['lite0_full_model_images_per_s']:.0f} img/s "
          f"(measured on {p['measured_on_images']} images)")
    o, e, tr = p["once"], p["per_run_eval_encoding"], p["per_run_training"]
    print(f"  once: bank {o['bank_views']:,} views ~{o['bank_extraction_s_est']:.0f} s, eval "
          f"{o['eval_views']:,} views ~{o['eval_extraction_s_est']:.0f} s (extrapolated)")
    print(f"  per run, eval encoding: full model ~{e['full_model_s_est']:.1f} s vs head on cached "
          f"{e['head_on_cached_s']:.3f} s ({e['ratio_full_over_head']:.0f}x)")
    print(f"  per run, training ({tr['steps']} steps): full model ~{tr['full_model_s_est']:.0f} s "
          f"vs head ~{tr['head_on_features_s_est']:.1f} s; validations "
          f"~{tr['validation_full_model_s_est']:.0f} s vs ~{tr['validation_head_s_est']:.2f} s")
    for th, r in res["tiny_cnn"].items():
        m, s, pr = r["pieces"]["ms"], r["pieces"]["shares"], r["pieces"]["profiler"]
        print(f"tiny-cnn step (28 px, 2x{res['config']['batch']}), {th}: {m['step']:.2f} ms = "
              f"network fwd {m['network_forward']:.2f} + loss fwd {m['loss_forward']:.2f} + "
              f"backward {m['backward']:.2f} + clip/Adam {m['clip_and_adam']:.2f}")
        print(f"  shares: network {100 * s['network']:.0f}%, loss {100 * s['loss']:.0f}%, "
              f"optimiser {100 * s['optimiser']:.0f}%; profiler: convolutions "
              f"{100 * pr['conv_share']:.0f}%, conv+bn+relu+pool "
              f"{100 * pr['conv_bn_relu_pool_share']:.0f}% of self CPU time")
        sd = r["seeds"]
        seq = sd["sequential"]["median_ms"]
        print(f"  {sd['seeds']} seeds: sequential {seq:.2f} ms")
        for k in ("grouped_conv", "vmap"):
            if k in sd:
                print(_row(f"  {k} ({sd[k + '_over_sequential']:.2f} x the time)",
                           sd[k]["median_ms"], seq))
        if "vmap_error" in sd:
            print(f"    vmap: {sd['vmap_error']}")


def main(argv: list[str] | None = None) -> None:
    """Run the measurements; print the table; write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="images per view per step")
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--clusters", type=int, default=10)
    ap.add_argument("--view-size", type=int, default=28, help="uint8 view size (the bank's)")
    ap.add_argument("--paper-size", type=int, default=48, help="the paper student's input")
    ap.add_argument("--tiny-size", type=int, default=28)
    ap.add_argument("--threads", default="1",
                    help="torch thread counts of the step timings, e.g. 1,2 (default 1: the "
                         "demo's workers are single-threaded)")
    ap.add_argument("--reps", type=int, default=10, help="timed rounds per measurement")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--extract-images", type=int, default=1024,
                    help="images of the measured feature extraction")
    ap.add_argument("--bank-images", type=int, default=5000)
    ap.add_argument("--views", type=int, default=8, help="augmented views per bank image")
    ap.add_argument("--val", type=int, default=500, help="validation queries")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--database", type=int, default=14000)
    ap.add_argument("--epochs", type=int, default=20, help="paper-student epochs per run")
    ap.add_argument("--group", type=int, default=3, help="seeds trained as one model")
    ap.add_argument("--autocast", choices=("none", "bf16"), default=None,
                    help="Lite0 backbone precision (default: bf16 where native, as the demo)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one thread (smoke run)")
    ap.add_argument("--out", default=None, help=f"JSON path (default {RESULT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.reps, args.warmup, args.extract_images = 16, 2, 1, 32
        args.threads, args.queries, args.database = "1", 100, 400
    threads = [int(x) for x in args.threads.split(",") if x.strip()]
    for name in ("batch", "bits", "reps", "extract_images", "group", "epochs"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not threads or min(threads) < 1:
        raise ValueError("--threads must list positive thread counts, e.g. 1,2")
    autocast = args.autocast or ("bf16" if cpu_has_bf16() else "none")
    env = _env()
    if max(threads) > max(1.0, env["free_cores_at_start"]):
        env["note"] = (f"{max(threads)} threads on {env['free_cores_at_start']} idle cores: "
                       "the multi-threaded figures include OpenMP stalls")
        print(f"note: {env['note']}")
    t_start = time.perf_counter()
    opts = DistillConfig(symmetric=True)  # the demo's BRCD (both views anchor)
    model = create_model(PAPER["name"], args.bits, pretrained=True, freeze_backbone=True,
                         head="mlp", hidden=PAPER["hidden"]).set_autocast(autocast)
    model.to(memory_format=torch.channels_last)
    res: dict = {
        "what": "student training cost: paper student (frozen Lite0 48 px) full model vs head on "
                "cached features; per-run encoding costs; tiny-cnn step split and grouped seeds",
        "config": {**{k: getattr(args, k) for k in ("batch", "bits", "clusters", "view_size",
                                                    "paper_size", "tiny_size", "reps",
                                                    "extract_images", "bank_images", "views",
                                                    "val", "queries", "database", "epochs",
                                                    "group", "quick")},
                   "autocast": autocast, "loss": "cibhash + brcd (symmetric, demo default)"},
        "env": env, "paper_student_step": {}, "tiny_cnn": {}}
    for th in threads:
        torch.set_num_threads(th)
        res["paper_student_step"][f"threads={th}"] = paper_step(args, model, opts)
    torch.set_num_threads(1)  # the demo's workers are single-threaded
    res["per_run"] = per_run(args, model, res["paper_student_step"]["threads=1"]
                             if 1 in threads else res["paper_student_step"][f"threads={th}"])
    for th in threads:
        torch.set_num_threads(th)
        res["tiny_cnn"][f"threads={th}"] = {"pieces": tiny_pieces(args, opts),
                                           "seeds": tiny_seeds(args, opts)}
    env["loadavg_at_end"] = os.getloadavg()
    env["loaded"] = max(env["loadavg_at_start"][0], env["loadavg_at_end"][0]) > 0.5 * (
        os.cpu_count() or 1)
    env["wall_s"] = round(time.perf_counter() - t_start, 1)
    _print(res)
    print(f"load average {env['loadavg_at_start'][0]:.2f} -> {env['loadavg_at_end'][0]:.2f} on "
          f"{os.cpu_count()} cores ({'loaded' if env['loaded'] else 'quiet'}); "
          f"{env['wall_s']} s")
    out = Path(args.out) if args.out else (None if args.quick else RESULT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
