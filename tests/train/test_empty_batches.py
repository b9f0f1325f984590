"""Micro-batches whose images are all unreadable: skipped and counted, no DDP deadlock, the math stays right.

The data set is a class folder where chosen micro-batches (found through the same GlobalBatchSampler the
loop uses) are overwritten with garbage bytes. Layout, global batch 16 = 4 chunks of 4, 3 updates:

* update 0: chunk 3 unreadable (DDP: rank 1's *last* micro-step, the one DDP synchronises on)
* update 1: every image unreadable (an update without data on any rank: the optimizer step is skipped)
* update 2: chunk 0 unreadable (rank 0's first micro-step) and one image of chunk 1 (a short micro-batch)

SGD, not AdamW, so that a wrongly weighted gradient shows in the weights (Adam's update is scale-free); the
1-process == 2-process check compares the gradients of each update at lr 0 (the same weights on both sides).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repvit.data import GlobalBatchSampler
from repvit.data.folder import validate_image_folder
from repvit.train import train

from trainhelpers import ROOT, cli_env, free_port, load_state, tiny_config

N_PER_CLASS, GB, BS, SEED = 32, 16, 4, 0
SET = [f"run.global_batch={GB}", f"run.batch_size={BS}", "run.max_steps_per_epoch=3", "schedule.epochs=1",
       "schedule.warmup_epochs=0", "optim.opt=sgd", "optim.lr=0.05", "aug.scale=[1.0, 1.0]", "aug.repeated_aug=1", "data.num_workers=0",
       "data.max_val_samples=null", "data.img_size=16", f"run.seed={SEED}", "optim.clip_mode=none"]


def _dataset(root: Path, bad_chunks=lambda c: c[3] + c[4] + c[5] + c[6] + c[7] + c[8] + c[9][:1]) -> Path:
    """Two classes of random 16x16 images, then the unreadable micro-batches of the module docstring
    (``bad_chunks`` picks other sample indices from the list of micro-batches)."""
    rng = np.random.RandomState(0)
    for split, n in (("train", N_PER_CLASS), ("val", 2)):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    _, samples = validate_image_folder(root / "train")           # the order SafeImageFolder uses
    s = GlobalBatchSampler(len(samples), GB, world_size=1, accum_steps=GB // BS, seed=SEED)
    s.set_epoch(0)
    chunks = list(s)                                             # micro-batch i = chunk i % 4 of update i // 4
    bad = bad_chunks(chunks)
    for i in bad:
        Path(samples[i][0]).write_bytes(b"not an image")
    return root


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def _check_counts(run: Path) -> None:
    m = _metrics(run)
    assert m["skipped_images"] == 6 * 4 + 1 and m["dropped_images"] == 0   # all unreadable, none dropped
    assert m["empty_batches"] == 6 and m["empty_updates"] == 1
    assert m["step"] == 3 and np.isfinite(m["train_loss"])
    assert "6 empty micro-batch(es) skipped, 1 update(s) without data" in (run / "train.log").read_text()


def test_empty_micro_batches_single_process(tmp_path):
    root = _dataset(tmp_path / "ds")
    run = tmp_path / "run"
    res = train(tiny_config(f"data.dataset={root}", *SET), run)
    _check_counts(run)
    st = load_state(run)
    assert all(torch.isfinite(v).all() for v in st["model"].values())
    assert res.deploy_top1 is not None


def test_micro_batch_with_one_readable_image_is_dropped(tmp_path):
    """3 of 4 images unreadable leaves one sample, on which BatchNorm cannot train: it is dropped and counted,
    and the run goes on (before: 'Expected more than 1 value per channel when training')."""
    root = _dataset(tmp_path / "ds", bad_chunks=lambda c: c[0][:3])
    run = tmp_path / "run"
    train(tiny_config(f"data.dataset={root}", *SET), run)
    m = _metrics(run)
    assert m["skipped_images"] == 3 and m["dropped_images"] == 1
    assert m["empty_batches"] == 1 and m["empty_updates"] == 0
    assert m["step"] == 3 and np.isfinite(m["train_loss"])


def test_micro_batch_of_one_is_refused(tmp_path):
    root = _dataset(tmp_path / "ds", bad_chunks=lambda c: [])
    with pytest.raises(ValueError, match="at least 2 per micro-batch"):
        train(tiny_config(f"data.dataset={root}", *SET, "run.global_batch=4", "run.batch_size=1"), tmp_path / "run")


# lr schedule of the 1- vs 2-process comparison: linear warmup from 0 over all 3 updates, so update 0 steps with lr 0
# (its gradient is applied with a zero step), update 1 has no data (no step) and update 2 steps with lr 0.05 * 2 / 3.
# Every gradient is thus computed at the initial weights on both sides, and the weights after update 2 show a real
# update with lr > 0 (SGD, momentum 0.9: update 0's gradient enters it through the momentum buffer).
RAMP = ["optim.lr=0.05", "schedule.warmup_epochs=1", "schedule.warmup_lr=0.0"]


def test_ddp_rank_with_an_empty_micro_batch_does_not_hang(tmp_path, monkeypatch):
    """2 processes x 2 micro-steps == 1 process x 4 micro-steps, update by update, with empty micro-batches.

    Compared as the gradients handed to each optimizer step, all computed at the same (initial) weights (RAMP),
    and as the weights after the one update with lr > 0: comparing weights after several real steps instead was
    at the mercy of the CPU's kernels (BatchNorm over 3-4 samples on the 1x1-2x2 maps of this 16x16 toy input,
    with near-zero batch variance in some channels, turns summation-order rounding after the first update into
    gradient gaps of percents with oneDNN's AVX-512 depthwise kernels; docs/training.md). No forward pass runs
    after the lr > 0 step, so the final weights differ only by that step's rounding."""
    import repvit.train.loop as loop

    root = _dataset(tmp_path / "ds")
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__).with_name("ddp_capture_worker.py")), str(ddp), f"data.dataset={root}", *SET, *RAMP]
    try:
        p = subprocess.run(cmd, env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:  # a deadlock (NCCL) hangs: fail instead of hanging the suite
        pytest.fail(f"2-process DDP run with an empty micro-batch hung (killed after {e.timeout} s)")
    assert p.returncode == 0, p.stderr[-3000:]
    _check_counts(ddp)
    g0, g1 = (torch.load(ddp / f"grads_rank{r}.pt") for r in (0, 1))
    assert len(g0) == len(g1) == 2                      # update 1 has no readable image on any rank: no step
    for a, b in zip(g0, g1):                            # every rank steps with the same all-reduced gradient
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) and torch.isfinite(a[n]).all() for n in a)
    p0, p1 = (torch.load(ddp / f"params_rank{r}.pt") for r in (0, 1))
    assert set(p0) == set(p1) and all(torch.equal(p0[n], p1[n]) for n in p0)   # the ranks' weights stay equal

    # the same run in one process (4 micro-steps per update), its gradients, lrs and weights recorded per step
    single, lrs, before = [], [], []

    def optimization(c, model, **k):
        opt, sched = loop_build(c, model, **k)
        real_step = opt.step

        def step(*sa, **sk):
            single.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
            before.append({n: p.detach().clone() for n, p in model.named_parameters()})
            lrs.append(opt.param_groups[0]["lr"])
            return real_step(*sa, **sk)
        opt.step = step
        return opt, sched

    loop_build = loop.build_optimization
    monkeypatch.setattr(loop, "build_optimization", optimization)
    train(tiny_config(f"data.dataset={root}", *SET, *RAMP), tmp_path / "single")
    assert len(single) == 2
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.05 * 2 / 3)    # the ramp the comparison relies on
    for n in before[0]:                                  # both gradients were computed at the initial weights
        assert torch.equal(before[0][n], before[1][n]), n
    for update, (mine, theirs) in enumerate(zip(single, g0)):
        theirs = {n.removeprefix("module."): g for n, g in theirs.items()}     # DDP wraps the model
        assert set(mine) == set(theirs)
        want = torch.cat([mine[n].flatten() for n in mine]).double()
        got = torch.cat([theirs[n].flatten() for n in mine]).double()
        # summation order gives ~1e-6 relative; counting an empty or short micro-batch wrongly is >= 1/12 off
        assert (got - want).norm() <= 1e-4 * want.norm(), (update, float((got - want).norm() / want.norm()))

    # the weights after the lr > 0 update: the change each run made to the initial weights agrees
    w_single = load_state(tmp_path / "single")["model"]
    names = sorted(before[0])
    assert {n.removeprefix("module.") for n in p0} == set(names)
    p0 = {n.removeprefix("module."): w for n, w in p0.items()}
    w0 = torch.cat([before[0][n].flatten() for n in names]).double()
    d_single = torch.cat([w_single[n].flatten() for n in names]).double() - w0
    d_ddp = torch.cat([p0[n].flatten() for n in names]).double() - w0
    assert d_single.norm() > 1e-3 * w0.norm()            # a real step was taken
    assert (d_ddp - d_single).norm() <= 1e-4 * d_single.norm(), float((d_ddp - d_single).norm() / d_single.norm())


def test_sync_bn_skips_a_micro_step_some_rank_has_no_data_for_on_all_ranks(tmp_path):
    """With SyncBatchNorm the ranks with data would enter its all_gather while an empty rank goes on to the next
    all-reduce (a hang); the loop skips such a micro-step on every rank and counts it. Run on CPU through the
    SyncBN code path (the worker flags the model as holding SyncBatchNorm; PyTorch has no CPU kernel for it).

    Layout (module docstring, chunk = micro-step * 2 + rank): update 0, micro-step 1: rank 1 empty, rank 0's 4
    images left out; update 1: empty everywhere (an empty update, not a SyncBN skip); update 2, micro-step 0:
    rank 0 empty, rank 1's 3 readable images left out."""
    root = _dataset(tmp_path / "ds")
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__).with_name("ddp_capture_worker.py")), "--as-if-sync-bn", str(ddp),
           f"data.dataset={root}", *SET]
    try:
        p = subprocess.run(cmd, env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"2-process DDP run on the SyncBN path hung (killed after {e.timeout} s)")
    assert p.returncode == 0, p.stderr[-3000:]
    m = _metrics(ddp)
    assert m["sync_bn_skipped_steps"] == 2 and m["dropped_images"] == 4 + 3
    assert m["skipped_images"] == 6 * 4 + 1 and m["empty_batches"] == 6 and m["empty_updates"] == 1
    assert m["step"] == 3 and np.isfinite(m["train_loss"])
    log = (ddp / "train.log").read_text()
    assert "with run.sync_bn this micro-step is skipped on all ranks" in log
    assert "2 micro-step(s) skipped on all ranks" in log
    g0, g1 = (torch.load(ddp / f"grads_rank{r}.pt") for r in (0, 1))
    assert len(g0) == len(g1) == 2                       # updates 0 and 2 step (each kept one micro-step)
    for a, b in zip(g0, g1):
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) and torch.isfinite(a[n]).all() for n in a)


def test_update_gradient_is_the_mean_over_the_images_read(tmp_path, monkeypatch):
    """The gradient handed to the optimizer equals the gradient of the mean loss over the images actually read
    in that update (recomputed here from the very micro-batches the loop drew). The 1- vs 2-process check above
    cannot see a weighting error that both paths share (e.g. no renormalisation to the real sample count)."""
    import copy

    import repvit.train.loop as loop

    root = _dataset(tmp_path / "ds")
    cfg = tiny_config(f"data.dataset={root}", *SET)
    built, batches, steps = [], [], []
    build_student, build_optimization, data_loader = loop.build_student, loop.build_optimization, loop.DataLoader

    def build(*a, **k):
        m = build_student(*a, **k)
        built.append(m)
        return m

    def optimization(c, model, **k):
        opt, sched = build_optimization(c, model, **k)
        real_step = opt.step

        def step(*sa, **sk):   # weights used by this update's forward passes, and the gradient it steps with
            steps.append(({n: p.detach().clone() for n, p in model.named_parameters()},
                          {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
            return real_step(*sa, **sk)
        opt.step = step
        return opt, sched

    class Recording(data_loader):
        def __iter__(self):
            for b in super().__iter__():
                batches.append(b)
                yield b

    monkeypatch.setattr(loop, "build_student", build)
    monkeypatch.setattr(loop, "build_optimization", optimization)
    monkeypatch.setattr(loop, "DataLoader", Recording)
    train(cfg, tmp_path / "run")
    assert len(batches) == 12 and len(steps) == 2         # update 1 has no readable image: no optimizer step
    criterion = loop._build_loss(cfg, False)
    for (weights, grads), update in zip(steps, (0, 2)):
        m = copy.deepcopy(built[0]).train()
        m.load_state_dict(weights, strict=False)
        m.zero_grad(set_to_none=True)
        total, n = 0.0, 0
        for x, y, _, _ in batches[4 * update:4 * update + 4]:
            if len(y):
                total = total + criterion(m(x), y, None, teacher_is_dist=False) * len(y)
                n += len(y)
        assert n == (12 if update == 0 else 11)
        (total / n).backward()
        ref = {name: p.grad for name, p in m.named_parameters() if p.grad is not None}
        assert set(ref) == set(grads)
        got, want = torch.cat([grads[k].flatten() for k in ref]), torch.cat([ref[k].flatten() for k in ref])
        # float noise of accumulating micro-batches is ~1e-6 relative; a wrong weighting is >= 1/12 off
        assert (got - want).norm() <= 1e-4 * want.norm(), (update, float((got - want).norm() / want.norm()))


_AVERAGE_WORKER = """
import sys, torch, torch.distributed as dist
from repvit.train.dist import average_gradients
dist.init_process_group("gloo")
r = dist.get_rank()
both, only_rank0, unused = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
both.grad = torch.full((3,), float(r + 1))            # 1 on rank 0, 2 on rank 1
if r == 0:
    only_rank0.grad = torch.full((3,), 4.0)
average_gradients([both, only_rank0, unused], 2)
torch.save({"both": both.grad, "only_rank0": only_rank0.grad, "unused": unused.grad}, sys.argv[1] + f"/r{r}.pt")
dist.destroy_process_group()
"""


def test_average_gradients_by_hand(tmp_path):
    """The by-hand all-reduce of an update some rank had no data for: means over ranks (a rank without a gradient
    counts as zero), and a parameter without a gradient on any rank keeps None (no weight decay on it)."""
    worker = tmp_path / "worker.py"
    worker.write_text(_AVERAGE_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(worker), str(tmp_path)]
    p = subprocess.run(cmd, env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    for r in (0, 1):
        g = torch.load(tmp_path / f"r{r}.pt")
        assert torch.equal(g["both"], torch.full((3,), 1.5))
        assert torch.equal(g["only_rank0"], torch.full((3,), 2.0))
        assert g["unused"] is None
