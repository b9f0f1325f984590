"""Schedule values, distillation losses, AGC and EMA against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repvit.models import build_model
from repvit.train import train
from repvit.train.distill import DistillationLoss, FrozenTeacher, teacher_targets
from repvit.train.loop import build_optimization
from repvit.train.recipes import load_recipe

from trainhelpers import tiny_config


@pytest.mark.parametrize("world, accum", [(8, 1), (1, 8)])
def test_official_schedule_values_at_given_epochs(world, accum):
    cfg = load_recipe("repvit_m0_9_300e")
    assert cfg.accum_steps(world) == accum and cfg.schedule.step_per == "epoch"
    model = build_model("repvit_m0_6", num_classes=10)
    upe = 10   # updates per epoch
    peak, lo, w0 = 4e-3, 1e-5, 1e-6

    def cosine(epoch: float) -> float:
        return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * epoch / 300))

    # the recipe as the official loop runs it: the schedule's value at whole epochs (scheduler.step(epoch))
    opt, sched = build_optimization(cfg, model, world_size=world, updates_per_epoch=upe)

    def lr_epoch(epoch: int) -> float:
        sched.step(epoch)
        return opt.param_groups[0]["lr"]

    assert opt.param_groups[0]["lr"] == pytest.approx(w0)               # before the first step: the warmup start
    assert lr_epoch(0) == pytest.approx(w0)
    assert lr_epoch(2) == pytest.approx(w0 + (peak - w0) * 2 / 5)       # linear warmup, 2 of 5 epochs
    assert lr_epoch(5) == pytest.approx(cosine(5))
    assert lr_epoch(150) == pytest.approx((peak + lo) / 2)
    assert lr_epoch(240) == pytest.approx(cosine(240))
    sched.step_update(7)                                                  # per-update steps change nothing here
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine(240))

    # the same schedule stepped every update (schedule.step_per=update): equal at epoch boundaries, smooth between
    cfg.schedule.step_per = "update"
    opt, sched = build_optimization(cfg, model, world_size=world, updates_per_epoch=upe)

    def lr_at(epoch: float) -> float:
        sched.step_update(int(round(epoch * upe)))
        return opt.param_groups[0]["lr"]

    assert lr_at(0) == pytest.approx(w0)
    assert lr_at(2.5) == pytest.approx(w0 + (peak - w0) * 0.5)        # linear warmup, halfway
    assert lr_at(5) == pytest.approx(cosine(5))
    assert lr_at(150) == pytest.approx((peak + lo) / 2)
    assert lr_at(240) == pytest.approx(cosine(240))
    assert lr_at(300) == pytest.approx(lo)


def test_no_weight_decay_on_norms_and_biases():
    cfg = load_recipe("repvit_m0_9_300e")
    model = build_model("repvit_m0_6", num_classes=10)
    opt, _ = build_optimization(cfg, model, world_size=8, updates_per_epoch=10)
    by_id = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            if p.ndim <= 1:
                assert g["weight_decay"] == 0.0, by_id[id(p)]
            else:
                assert g["weight_decay"] == 0.025, by_id[id(p)]


def test_hard_distillation_loss_by_hand():
    cls = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    dist = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    y = torch.tensor([0, 1])
    teacher = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])   # argmax: 1, 0
    loss = DistillationLoss(nn.CrossEntropyLoss(), "hard", alpha=0.5)((cls, dist), y, teacher)

    def ce(logits, t):
        return -(logits[t] - math.log(sum(math.exp(v) for v in logits)))
    base = (ce([2.0, 0.0, -1.0], 0) + ce([0.5, 0.5, 0.0], 1)) / 2
    kd = (ce([0.0, 1.0, 0.0], 1) + ce([1.0, -1.0, 2.0], 0)) / 2
    assert loss.item() == pytest.approx(0.5 * base + 0.5 * kd, rel=1e-6)
    # alpha weights the two terms
    l2 = DistillationLoss(nn.CrossEntropyLoss(), "hard", alpha=0.25)((cls, dist), y, teacher)
    assert l2.item() == pytest.approx(0.75 * base + 0.25 * kd, rel=1e-6)


def test_soft_distillation_loss_by_hand():
    cls = torch.tensor([[1.0, 0.0]])
    dist = torch.tensor([[0.0, 2.0]])
    teacher = torch.tensor([[1.0, -1.0]])
    y = torch.tensor([0])
    tau = 2.0
    loss = DistillationLoss(nn.CrossEntropyLoss(), "soft", alpha=0.5, tau=tau)((cls, dist), y, teacher)

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]
    p = softmax([0.5, -0.5])            # teacher / tau
    q = softmax([0.0, 1.0])             # student dist / tau
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    base = -math.log(softmax([1.0, 0.0])[0])
    assert loss.item() == pytest.approx(0.5 * base + 0.5 * kl * tau * tau, rel=1e-6)


def test_precomputed_hard_targets_mix_like_labels():
    t = torch.tensor([[0.0, 4.0], [3.0, 1.0]])
    p = teacher_targets(t, "hard")
    assert torch.equal(p, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    dist = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    mixed = 0.7 * p + 0.3 * p.flip(0)
    loss = DistillationLoss(nn.CrossEntropyLoss(), "hard", alpha=1.0)((dist, dist), torch.tensor([0, 0]),
                                                                      mixed, teacher_is_dist=True)
    ls = F.log_softmax(dist, -1)
    assert loss.item() == pytest.approx(-(mixed * ls).sum(-1).mean().item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_cached_teacher_targets_equal_the_dense_ones(kind):
    from repvit.train.distill import CachedTeacherTargets
    torch.manual_seed(0)
    logits = torch.randn(50, 7) * 3
    cached = CachedTeacherTargets(logits, kind, tau=2.0)
    idx = torch.tensor([3, 0, 49, 3, 17])
    torch.testing.assert_close(cached[idx], teacher_targets(logits, kind, 2.0)[idx], rtol=0, atol=0)
    assert len(cached) == 50
    if kind == "hard":      # one class per sample is kept, not the dense one-hot table
        assert cached.probs is None and cached.classes.shape == (50,)


def test_frozen_teacher_stays_in_eval_mode_without_grads():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    t = FrozenTeacher(net)
    t.train()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    before = net[1].running_mean.clone()
    out = t(torch.randn(8, 4) + 5)
    assert torch.equal(net[1].running_mean, before) and not out.requires_grad


def test_teacher_keeps_its_trained_classifier_or_refuses(tmp_path):
    """A teacher's head is what it teaches: loaded as saved (never re-initialised to fit the data's class count),
    and a class-count mismatch is an error, not a random head."""
    import repvit
    from repvit.train.distill import build_teacher
    src = repvit.create_model("repvit_m0_6", num_classes=10, in_chans=1)
    repvit.save_checkpoint(src, tmp_path / "t10.safetensors")
    t = build_teacher("repvit_m0_6", str(tmp_path / "t10.safetensors"), num_classes=10, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(t(x), src.eval()(x), atol=1e-5)       # the saved head (folded into the deploy form)
    with pytest.raises(ValueError, match="predicts 10 classes but the data has 7"):
        build_teacher("RepViT-M0.6", str(tmp_path / "t10.safetensors"), num_classes=7, in_chans=1)
    timm = pytest.importorskip("timm")
    tm = timm.create_model("mobilenetv3_small_050", num_classes=10, in_chans=1)
    torch.save(tm.state_dict(), tmp_path / "timm10.pth")
    t = build_teacher("mobilenetv3_small_050", str(tmp_path / "timm10.pth"), num_classes=10, in_chans=1)
    assert torch.equal(t.model.classifier.weight, tm.classifier.weight)
    with pytest.raises(ValueError, match="does not fit timm's mobilenetv3_small_050 with 7 classes"):
        build_teacher("mobilenetv3_small_050", str(tmp_path / "timm10.pth"), num_classes=7, in_chans=1)


def test_finetune_student_keeps_the_trained_head_when_only_distillation_differs(tmp_path):
    """Same classes, distillation switched on: the class head keeps its trained weights and the distillation head
    starts from it; a new class count gets a fresh head."""
    import repvit
    from repvit.train.builder import build_student
    from repvit.train.config import TrainConfig, apply_overrides
    src = repvit.create_model("repvit_m0_6", num_classes=10, in_chans=1)
    path = tmp_path / "best.safetensors"
    repvit.save_checkpoint(src, path)
    cfg = apply_overrides(TrainConfig(), ["model.name=repvit_m0_6", f"model.pretrained={path}", "distill.kind=hard"])
    m = build_student(cfg, 10, 1)
    assert m.distillation
    assert torch.equal(m.head.head.l.weight, src.head.head.l.weight)
    assert torch.equal(m.head.head_dist.l.weight, src.head.head.l.weight)
    m7 = build_student(cfg, 7, 1)
    assert m7.num_classes == 7 and m7.distillation


def test_teacher_input_mismatch_names_the_difference():
    from repvit.train.distill import teacher_input_mismatch
    t = build_model("repvit_m0_6", num_classes=10, in_chans=1)
    t.preprocessing = {"mean": [0.286], "std": [0.353]}
    assert teacher_input_mismatch(t, {"mean": [0.286], "std": [0.353]}) is None
    note = teacher_input_mismatch(t, {"mean": [0.5], "std": [0.353]})
    assert note is not None and "mean (0.286,)" in note and "(0.5,)" in note and "std" not in note
    assert teacher_input_mismatch(nn.Linear(2, 2), {"mean": [0.5], "std": [0.5]}) is None   # unknown: no claim


def test_reparam_ablation_refuses_a_pretrained_student(tmp_path):
    import repvit
    from repvit.train.builder import build_student
    from repvit.train.config import TrainConfig, apply_overrides
    repvit.save_checkpoint(build_model("repvit_m0_6", num_classes=10), tmp_path / "m.safetensors")
    cfg = apply_overrides(TrainConfig(), ["model.name=repvit_m0_6", f"model.pretrained={tmp_path / 'm.safetensors'}",
                                          "model.reparam_branches=false"])
    with pytest.raises(ValueError, match="reparam_branches=false"):
        build_student(cfg, 10, 3)


def test_reset_classifier_keeps_the_models_mode():
    m = build_model("repvit_m0_6", num_classes=10).eval()
    m.reset_classifier(4)
    assert not m.head.training
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4)   # batch of 1 in eval: BatchNorm1d on running stats


def test_adaptive_gradient_clipping_by_hand():
    from timm.utils import dispatch_clip_grad
    w = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.001]]))      # row norms 5 and 0.001
    w.grad = torch.tensor([[30.0, 40.0], [0.0, 1.0]])                 # grad row norms 50 and 1
    dispatch_clip_grad([w], 0.02, mode="agc")
    # row 0: max = 0.02 * max(5, eps=1e-3) = 0.1 < 50 -> rescaled to norm 0.1
    assert torch.allclose(w.grad[0], torch.tensor([30.0, 40.0]) * (0.1 / 50.0))
    # row 1: max = 0.02 * max(0.001, 1e-3) = 2e-5 -> rescaled
    assert torch.allclose(w.grad[1], torch.tensor([0.0, 1.0]) * 2e-5)
    b = nn.Parameter(torch.tensor([10.0]))
    b.grad = torch.tensor([0.1])                                      # 0.1 < 0.02 * 10: untouched
    dispatch_clip_grad([b], 0.02, mode="agc")
    assert b.grad.item() == pytest.approx(0.1)


def test_ema_update_by_hand():
    from timm.utils import ModelEmaV3
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEmaV3(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, step=10)
    assert ema.module.weight[0, 0].item() == pytest.approx(0.9 * 1.0 + 0.1 * 3.0)
    ema.update(model, step=11)
    assert ema.module.weight[0, 0].item() == pytest.approx(0.9 * 1.2 + 0.1 * 3.0)


def test_reparam_ablation_removes_branches_but_keeps_the_deploy_architecture():
    from repvit.models.repvit import RepDWConv
    from repvit.reparam import reparameterize
    from repvit.train.builder import strip_reparam_branches
    full = build_model("repvit_m0_6", num_classes=10, in_chans=1)
    off = strip_reparam_branches(build_model("repvit_m0_6", num_classes=10, in_chans=1))
    assert any(isinstance(m, RepDWConv) for m in full.modules())
    assert not any(isinstance(m, RepDWConv) for m in off.modules())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(off) < n(full)
    # same network after fusing: identical parameter shapes
    fa, fb = reparameterize(full), reparameterize(off.eval())
    assert {k: v.shape for k, v in fa.state_dict().items()} == {k: v.shape for k, v in fb.state_dict().items()}


def test_teachers_run_in_their_fused_form_with_the_same_function(tmp_path):
    """A frozen teacher only runs in eval mode, so it runs folded: a RepViT checkpoint as its deploy form (no
    BatchNorm, no branch left), a timm model with re-parameterisable blocks through timm's own fold; the outputs
    are those of the model as trained (in eval mode)."""
    import repvit
    from repvit.reparam import is_deploy_form
    from repvit.train.distill import build_teacher
    torch.manual_seed(0)
    src = repvit.create_model("repvit_m0_6", num_classes=10, in_chans=1, distillation=True)
    for m in src.modules():                    # non-trivial BatchNorm statistics, so an un-folded one would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    repvit.save_checkpoint(src, tmp_path / "t.safetensors")
    t = build_teacher(str(tmp_path / "t.safetensors"), None, num_classes=10, in_chans=1)
    assert is_deploy_form(t.model) and not is_deploy_form(src)
    x = torch.randn(3, 1, 48, 48)
    assert torch.allclose(t(x), src.eval()(x), atol=1e-4)     # the eval output (mean of the heads), as before
    timm = pytest.importorskip("timm")
    tm = timm.create_model("mobileone_s0", num_classes=10, in_chans=1).eval()
    torch.save(tm.state_dict(), tmp_path / "mobileone.pth")
    t = build_teacher("mobileone_s0", str(tmp_path / "mobileone.pth"), num_classes=10, in_chans=1)
    n_bn = lambda m: sum(isinstance(b, nn.BatchNorm2d) for b in m.modules())   # noqa: E731
    assert n_bn(t.model) < n_bn(tm) // 4
    with torch.no_grad():
        want = tm(x)                                           # a random MobileOne's logits run to ~1e14
    assert torch.allclose(t(x), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_teacher_ensemble_predicts_the_mean_probability():
    from repvit.train.distill import TeacherEnsemble
    a, b = nn.Linear(3, 4), nn.Linear(3, 4)
    x = torch.randn(5, 3)
    ens = TeacherEnsemble([a, b])
    want = (F.softmax(a(x), -1) + F.softmax(b(x), -1)) / 2
    out = ens(x)
    assert torch.allclose(F.softmax(out, -1), want, atol=1e-6)
    # the soft and hard targets built from it are the ensemble's average prediction and its argmax
    assert torch.allclose(teacher_targets(out, "soft", 1.0), want, atol=1e-6)
    assert torch.equal(teacher_targets(out, "hard").argmax(-1), want.argmax(-1))
    with pytest.raises(ValueError, match="at least two"):
        TeacherEnsemble([a])


def test_comma_separated_teachers_build_a_frozen_ensemble(tmp_path):
    import repvit
    from repvit.train.distill import TeacherEnsemble, build_teacher
    paths = []
    for seed, n in ((0, 10), (1, 10), (2, 7)):
        torch.manual_seed(seed)
        m = repvit.create_model("repvit_m0_6", num_classes=n, in_chans=1)
        paths.append(tmp_path / f"t{seed}.safetensors")
        repvit.save_checkpoint(m, paths[-1])
    t = build_teacher(f"{paths[0]}, {paths[1]}", None, num_classes=10, in_chans=1)
    assert isinstance(t.model, TeacherEnsemble) and len(t.model.members) == 2
    assert not any(p.requires_grad for p in t.parameters())
    x = torch.randn(2, 1, 32, 32)
    want = sum(F.softmax(m(x), -1) for m in t.model.members) / 2
    assert torch.allclose(F.softmax(t(x), -1), want, atol=1e-5)
    with pytest.raises(ValueError, match="predicts 7 classes but the data has 10"):
        build_teacher(f"{paths[0]},{paths[2]}", None, num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match="teacher_checkpoint names one checkpoint"):
        build_teacher(f"{paths[0]},{paths[1]}", str(paths[0]), num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match="empty entry"):
        build_teacher(f"{paths[0]},", None, num_classes=10, in_chans=1)


def test_ensemble_input_mismatch_names_the_member():
    from repvit.train.distill import TeacherEnsemble, teacher_input_mismatch
    a, b = nn.Linear(3, 4), nn.Linear(3, 4)
    a.preprocessing = {"mean": [0.5], "std": [0.5]}
    b.preprocessing = {"mean": [0.2], "std": [0.5]}
    note = teacher_input_mismatch(TeacherEnsemble([a, b]), {"mean": [0.5], "std": [0.5]})
    assert note is not None and note.startswith("member 1:") and "member 0" not in note
    assert teacher_input_mismatch(TeacherEnsemble([a, a]), {"mean": [0.5], "std": [0.5]}) is None


# ---- the loop's own clipping and EMA (the two tests above check timm's functions, these check that the loop uses
# them as configured)

def _recording_run(tmp_path, monkeypatch, name: str, *overrides: str) -> list[dict]:
    """Train ``tiny_config(*overrides)``; per optimizer step: the weights it starts from, the gradients it steps
    with, and the model's state (parameters and buffers) right after it."""
    import repvit.train.loop as loop
    real_build, steps = loop.build_optimization, []

    def build(cfg, model, **kw):
        opt, sched = real_build(cfg, model, **kw)
        real_step = opt.step

        def step(*a, **k):
            rec = {"w": {n: p.detach().clone() for n, p in model.named_parameters()},
                   "g": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}}
            out = real_step(*a, **k)
            rec["after"] = {n: t.detach().clone() for n, t in model.state_dict().items()}
            steps.append(rec)
            return out
        opt.step = step
        return opt, sched

    monkeypatch.setattr(loop, "build_optimization", build)
    train(tiny_config(*overrides), tmp_path / name)
    monkeypatch.setattr(loop, "build_optimization", real_build)
    return steps


def _agc_by_hand(g: torch.Tensor, w: torch.Tensor, clip: float, eps: float = 1e-3) -> torch.Tensor:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, NFNets): each output unit's gradient norm is capped
    at clip * max(its weight norm, eps); vectors (norms, biases) count as one unit."""
    def unit_norm(t):
        return t.norm() if t.ndim <= 1 else t.flatten(1).norm(dim=1).view(-1, *[1] * (t.ndim - 1))
    gn, cap = unit_norm(g), clip * unit_norm(w).clamp_min(eps)
    return torch.where(gn > cap, g * (cap / gn.clamp_min(1e-6)), g)


def test_loop_clips_gradients_with_agc(tmp_path, monkeypatch):
    """optim.clip_mode=agc: the gradient the optimizer steps with is the unclipped one (same seed, clip_mode=none)
    clipped unit-wise against the weights, and the clipping really changed it."""
    one = ["schedule.epochs=1", "run.max_steps_per_epoch=1"]
    agc = _recording_run(tmp_path, monkeypatch, "agc", *one, "optim.clip_mode=agc", "optim.clip_grad=0.02")
    raw = _recording_run(tmp_path, monkeypatch, "none", *one, "optim.clip_mode=none")
    assert len(agc) == len(raw) == 1
    (a,), (r,) = agc, raw
    assert a["w"].keys() == r["w"].keys() and all(torch.equal(a["w"][n], r["w"][n]) for n in a["w"])
    assert a["g"].keys() == r["g"].keys() and len(a["g"]) > 10
    clipped = 0
    for n, g in a["g"].items():
        want = _agc_by_hand(r["g"][n], a["w"][n], 0.02)
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-9, msg=n)
        clipped += not torch.equal(want, r["g"][n])
    assert clipped >= 20, (clipped, len(a["g"]))       # measured: AGC 0.02 clips 70 of 256 tensors here


@pytest.mark.parametrize("warmup", [False, True])
def test_loop_updates_the_ema_with_the_configured_decay(tmp_path, monkeypatch, warmup):
    """The EMA in last.pt after 3 updates is the average of the loop's own weights after each update, with
    ema.decay=0.9 as timm's ModelEmaV3 applies it at update k (the loop passes the update count): decay 0 at
    k = 1 (the average starts from the first update's weights), then 0.9, or with ema.warmup
    min(0.9, 1 - k'^(-2/3)) for k' = k (timm's warmup, gamma 1, power 2/3)."""
    steps = _recording_run(tmp_path, monkeypatch, "run", "schedule.epochs=1", "run.max_steps_per_epoch=3",
                           "ema.enabled=true", "ema.decay=0.9", f"ema.warmup={str(warmup).lower()}")
    assert len(steps) == 3
    decays = [0.0] + [min(0.9, 1 - k ** (-2 / 3)) if warmup else 0.9 for k in (2, 3)]
    ema = None
    for d, s in zip(decays, steps):
        w = {n: t.double() for n, t in s["after"].items() if t.is_floating_point()}
        ema = w if ema is None else {n: d * ema[n] + (1 - d) * w[n] for n in w}
    got = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)["ema"]
    assert set(ema) <= set(got)
    for n in ema:
        torch.testing.assert_close(got[n].double(), ema[n], rtol=1e-5, atol=1e-6, msg=n)
    # the EMA really lags: it is not simply the last weights
    last = steps[-1]["after"]
    assert any(not torch.allclose(got[n], last[n], atol=1e-4) for n in ema)


@pytest.mark.parametrize("rank", [0, 1])
def test_main_rank_first_orders_the_body_around_one_barrier(monkeypatch, rank):
    """Rank 0 runs the body (a download into the shared cache) before the barrier, the others after it; rank 0
    reaches the barrier even when the body raises, so the others are released instead of hanging."""
    import torch.distributed as tdist

    from repvit.train.dist import DistInfo, main_rank_first
    events: list[str] = []
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "barrier", lambda *a, **k: events.append("barrier"))
    di = DistInfo(rank=rank, world_size=2)
    with main_rank_first(di):
        events.append("body")
    assert events == (["body", "barrier"] if rank == 0 else ["barrier", "body"])
    events.clear()
    with pytest.raises(OSError):
        with main_rank_first(di):
            events.append("body")
            raise OSError("download failed")
    assert events.count("barrier") == 1
    events.clear()
    with main_rank_first(DistInfo()):                      # one process: no barrier at all
        events.append("body")
    assert events == ["body"]


def test_aside_path_never_reuses_a_name(tmp_path):
    from repvit.train.loop import _aside_path
    assert _aside_path(tmp_path, "best-abandoned.safetensors") == tmp_path / "best-abandoned.safetensors"
    (tmp_path / "best-abandoned.safetensors").write_text("first")
    assert _aside_path(tmp_path, "best-abandoned.safetensors") == tmp_path / "best-abandoned-2.safetensors"
    (tmp_path / "best-abandoned-2.safetensors").write_text("second")
    assert _aside_path(tmp_path, "best-abandoned.safetensors").name == "best-abandoned-3.safetensors"


def test_indexed_dataset_without_seeds_draws_fresh_randomness():
    """Keys without a seed must not restore the random streams after each sample (every call would then repeat
    the same augmentation); keys with one are reproducible."""
    from repvit.train.loop import _Indexed

    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(()), i

    ds = _Indexed(Noisy())
    assert ds[0][0] != ds[0][0]
    assert ds.__getitems__([0, 1])[0][0] != ds.__getitems__([0, 1])[0][0]
    assert ds[(0, 7)][0] == ds[(0, 7)][0] and ds[(0, 7)][0] != ds[(0, 8)][0]
