"""CUDA checks for the optimisation callbacks: one PASS/FAIL line per check, under 3 minutes on an H100.

    python benchmarks/cuda_check.py                # on a CUDA machine
    python benchmarks/cuda_check.py --device cpu   # dry run of the same checks on the CPU

Checks: float16 autocast with a GradScaler (a forced inf gradient is skipped and counted), bfloat16
on CUDA without a scaler, float16 + accumulation + clipping against float32, pinned-memory batches
moved by DeviceCB with non_blocking=True, CompileCB (inductor) against eager outputs, and FSDP2 with
bfloat16 mixed precision (a process group of one: nccl on CUDA, gloo on the CPU; a sharded
checkpoint written and loaded back), and learn.profile (each part waits for the device in the
profiled batches; a normal fit never synchronises). Without CUDA and without --device it says so and exits 0.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from learnloop import (
    Callback,
    CompileCB,
    DataLoaders,
    DeviceCB,
    GradAccumCB,
    GradClipCB,
    Learner,
    MixedPrecisionCB,
)


def make_dls(pin: bool = False, n: int = 4096, bs: int = 256) -> DataLoaders:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 64, generator=g)
    y = (x[:, :8].sum(dim=1) > 0).long()
    train = DataLoader(TensorDataset(x, y), bs, pin_memory=pin)
    valid = DataLoader(TensorDataset(x[:1024], y[:1024]), bs * 2, pin_memory=pin)
    return DataLoaders(train, valid)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 2)
    )


def learner(device: str, cbs: list, pin: bool = False, lr: float = 0.2) -> Learner:
    return Learner(
        make_model(),
        make_dls(pin),
        lr=lr,
        cbs=[DeviceCB(device), *cbs],
        default_cbs=False,
    )


def linear_dtypes(learn: Learner) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    learn.model[0].register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    return seen


def mean_loss(learn: Learner) -> float:
    preds, targets = learn.get_preds()
    return float(nn.functional.cross_entropy(preds, targets))


def check_fp16_scaler(device: str) -> str:
    """float16 + GradScaler trains; a forced inf step is skipped (weights kept), counted, scale halved."""
    seen_state: dict[str, object] = {}

    class InjectInf(Callback):
        order = MixedPrecisionCB.order - 1  # after backward, before it unscales

        def after_backward(self, learn, *args, **kwargs):
            if (learn.epoch, learn.iter) == (1, 3):
                seen_state["weights"] = [
                    p.detach().clone() for p in learn.model.parameters()
                ]
                seen_state["scale"] = mp.scaler.get_scale()
                seen_state["skipped"] = mp.skipped_steps
                next(learn.model.parameters()).grad[0, 0] = float("inf")

        def after_batch(self, learn, *args, **kwargs):
            if (learn.epoch, learn.iter) == (1, 3):
                kept = all(
                    torch.equal(a, b)
                    for a, b in zip(seen_state["weights"], learn.model.parameters())
                )
                seen_state["kept"] = kept
                seen_state["scale_after"] = mp.scaler.get_scale()
                seen_state["skipped_after"] = mp.skipped_steps

    mp = MixedPrecisionCB(torch.float16)
    learn = learner(device, [mp, InjectInf()])
    dtypes = linear_dtypes(learn)
    before = mean_loss(learn)
    learn.fit(3)
    after = mean_loss(learn)
    assert mp.scaler is not None, "no GradScaler was made for float16"
    assert dtypes == {torch.float16}, f"Linear outputs were {dtypes}, expected float16"
    assert seen_state["kept"], "weights changed on the step with an inf gradient"
    assert seen_state["skipped_after"] == seen_state["skipped"] + 1, (
        "the inf step was not counted"
    )
    assert seen_state["scale_after"] == seen_state["scale"] / 2, (
        "the loss scale did not halve"
    )
    assert after < before * 0.9, f"loss did not fall: {before:.4f} -> {after:.4f}"
    return f"loss {before:.3f} -> {after:.3f}, skipped {mp.skipped_per_epoch}, scale {mp.scaler.get_scale():g}"


def check_bf16(device: str) -> str:
    """bfloat16 autocast on request: no scaler, bf16 activations, float32 preds, training works."""
    mp = MixedPrecisionCB(torch.bfloat16)
    learn = learner(device, [mp])
    dtypes = linear_dtypes(learn)
    before = mean_loss(learn)
    learn.fit(2)
    after = mean_loss(learn)
    preds, _ = learn.get_preds()
    assert mp.scaler is None, "bfloat16 should not use a GradScaler"
    assert dtypes == {torch.bfloat16}, f"Linear outputs were {dtypes}"
    assert preds.dtype == torch.float32, f"preds are {preds.dtype}"
    assert after < before * 0.9, f"loss did not fall: {before:.4f} -> {after:.4f}"
    return f"loss {before:.3f} -> {after:.3f}"


def check_fp16_accum_clip(device: str) -> str:
    """float16 + GradAccumCB + GradClipCB: clipped norms are the true (unscaled) ones, as in float32."""
    ref_clip, mp_clip = GradClipCB(1.0), GradClipCB(1.0)
    ref = learner(device, [GradAccumCB(4), ref_clip])
    mixed = learner(device, [GradAccumCB(4), MixedPrecisionCB(torch.float16), mp_clip])
    ref.fit(1)
    mixed.fit(1)
    a, b = torch.tensor(ref_clip.norms), torch.tensor(mp_clip.norms)
    assert len(a) == len(b) == 4, f"expected 4 steps, got {len(a)} and {len(b)}"
    assert torch.allclose(a, b, rtol=0.05), (
        f"norms differ: {a.tolist()} vs {b.tolist()}"
    )
    return f"norms {[round(v, 3) for v in b.tolist()]}"


def check_pinned_non_blocking(device: str) -> str:
    """Pinned loader batches reach the GPU through DeviceCB's non_blocking copies; results match unpinned."""
    if device != "cuda":
        return "SKIP (pinned memory needs CUDA)"
    seen: dict[str, bool] = {}

    class Spy(Callback):
        order = DeviceCB.order - 1  # before DeviceCB moves the batch

        def before_batch(self, learn, *args, **kwargs):
            seen.setdefault("pinned", learn.batch[0].is_pinned())

        def after_pred(self, learn, *args, **kwargs):
            seen.setdefault("on_gpu", learn.xb.is_cuda)

    pinned = learner(device, [Spy()], pin=True)
    plain = learner(device, [], pin=False)
    pinned.fit(1)
    plain.fit(1)
    torch.cuda.synchronize()
    assert seen == {"pinned": True, "on_gpu": True}, f"batches: {seen}"
    for p, q in zip(pinned.model.parameters(), plain.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), "pinned and unpinned training differ"
    return "pinned -> cuda, same weights as unpinned"


def check_compile(device: str) -> str:
    """CompileCB (inductor) trains, and the compiled model's outputs match eager within tolerance."""
    learn = learner(device, [CompileCB()])
    start = time.perf_counter()
    learn.fit(1)
    took = time.perf_counter() - start
    x = torch.randn(512, 64, device=device)
    with torch.no_grad():
        compiled, eager = learn.model(x), learn.model.forward(x)
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=1e-4), (
        "compiled and eager outputs differ"
    )
    return f"first fit (with compilation) {took:.1f}s"


def check_fsdp_bf16(device: str) -> str:
    """FSDP2 + MixedPrecisionCB(bf16): bf16 compute, float32 sharded parameters, a sharded checkpoint."""
    import os
    import socket
    import tempfile

    import torch.distributed as dist

    from learnloop import DistributedCB

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        os.environ.pop(var, None)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    try:
        fsdp = DistributedCB(strategy="fsdp", shard=nn.Linear)
        learn = learner(device, [fsdp, MixedPrecisionCB(torch.bfloat16)])
        dtypes = linear_dtypes(learn)
        before = mean_loss(learn)
        learn.fit(2)
        after = mean_loss(learn)
        weight = learn.model[0].weight
        assert type(weight).__name__ == "DTensor", (
            f"weights are {type(weight).__name__}"
        )
        assert weight.to_local().dtype == torch.float32, "sharded weights not float32"
        assert weight.device.type == device, f"weights on {weight.device}"
        assert dtypes == {torch.bfloat16}, f"Linear outputs were {dtypes}"
        assert after < before * 0.9, f"loss did not fall: {before:.4f} -> {after:.4f}"
        with tempfile.TemporaryDirectory() as folder:
            learn.save(f"{folder}/ck")
            saved = weight.full_tensor().clone()
            learn.fit(3, resume=f"{folder}/ck")
            learn.load(f"{folder}/ck")
            assert torch.equal(learn.model[0].weight.full_tensor(), saved)
    finally:
        dist.destroy_process_group()
    return f"{backend}, loss {before:.3f} -> {after:.3f}, sharded checkpoint round trip"


def check_profile(device: str) -> str:
    """learn.profile on the device: parts tile the step, each waits for the device; a normal fit never syncs."""
    syncs = []
    real_sync = torch.cuda.synchronize

    def counting_sync(*args, **kwargs):
        syncs.append(1)
        return real_sync(*args, **kwargs)

    learn = learner(device, [], pin=device == "cuda")
    torch.cuda.synchronize = counting_sync
    try:
        learn.fit(1)
        in_fit = len(syncs)
        report = learn.profile(n_batches=8)
    finally:
        torch.cuda.synchronize = real_sync
    train = report.train
    total = sum(train.parts_us.values())
    assert in_fit == 0, f"a normal fit synchronised {in_fit} times"
    assert report.synced == (device == "cuda"), report.synced
    if device == "cuda":
        assert len(syncs) > 0, "the profiled batches never waited for the device"
    assert abs(total - train.step_us) <= 0.05 * train.step_us, (total, train.step_us)
    assert train.parts_us["forward"] > 0 and train.parts_us["backward"] > 0
    # Mixed precision (float16 with a GradScaler on CUDA): its hooks run backward and the step,
    # which count as those pieces, not as the callback's.
    mixed = learner(device, [MixedPrecisionCB()]).profile(n_batches=8).train
    assert mixed.parts_us["backward"] > 0 and mixed.parts_us["optimizer step"] > 0, (
        mixed
    )
    hook = mixed.parts_us.get("MixedPrecisionCB.before_backward", 0.0)
    assert hook < 0.1 * mixed.parts_us["backward"], mixed.parts_us
    top = sorted(train.parts_us.items(), key=lambda kv: -kv[1])[:3]
    return (
        f"step {train.step_us:.0f} us, sum of parts {total:.0f} us, "
        f"top: {', '.join(f'{p} {us:.0f}' for p, us in top)}; {report.advice}"
    )


def check_batches_already_there(device: str) -> str:
    """A loader yielding batches on the device already: DeviceCB("cuda") moves none of them again."""
    import learnloop.callbacks.device as device_module

    moved = []
    real = device_module.to_device

    def counting(obj, *args, **kwargs):
        moved.append(1)
        return real(obj, *args, **kwargs)

    batches = [(x.to(device), y.to(device)) for x, y in make_dls().train]
    learn = Learner(
        make_model(),
        DataLoaders(batches, batches[:2]),
        cbs=[DeviceCB(device)],
        default_cbs=False,
    )
    device_module.to_device = counting
    try:
        learn.fit(1)
    finally:
        device_module.to_device = real
    assert not moved, f"{len(moved)} batches already on {device} were moved again"
    return f"{len(batches)} + 2 batches on {device}, none moved again"


CHECKS: list[Callable[[str], str]] = [
    check_fp16_scaler,
    check_bf16,
    check_fp16_accum_clip,
    check_pinned_non_blocking,
    check_compile,
    check_fsdp_bf16,
    check_profile,
    check_batches_already_there,
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default=None, help="cuda (default) or cpu for a dry run"
    )
    device = parser.parse_args().device
    if device is None:
        if not torch.cuda.is_available():
            print(
                "CUDA is not available: no CUDA checks run (use --device cpu for a dry run). EXIT 0"
            )
            return 0
        device = "cuda"
    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else "")
    )
    counts = {"PASS": 0, "SKIP": 0, "FAIL": 0}
    for check in CHECKS:
        start = time.perf_counter()
        try:
            detail = check(device)
            status = "SKIP" if detail.startswith("SKIP") else "PASS"
        except Exception as e:  # noqa: BLE001 - report the failed check, run the others
            status, detail = "FAIL", f"{type(e).__name__}: {e}"
            traceback.print_exc(file=sys.stderr)
        counts[status] += 1
        print(
            f"{status} {check.__name__:<28} {time.perf_counter() - start:6.1f}s  {detail}",
            flush=True,
        )
    verdict = "FAIL" if counts["FAIL"] else "PASS"
    print(
        f"{verdict}: {counts['PASS']} passed, {counts['SKIP']} skipped, {counts['FAIL']} failed"
    )
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
