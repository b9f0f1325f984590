"""Distillation inside the loop: a checkpoint teacher, online and precomputed, with mixup on.

The loss is spied on: the teacher targets it receives in each step must be the teacher's own outputs for that
step's images, computed here from the checkpoint files by an independent path (the state dicts loaded into a
freshly built model), so an ignored, mis-indexed or half-used (ensemble) teacher fails."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from repvit.models import build_model
from repvit.train import train

from trainhelpers import tiny_config


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A teacher run directory (2 updates): best.safetensors and last.pt, the two teachers (ensemble members).

    A teacher this short predicts one class for every image in eval mode (BatchNorm's running statistics lag far
    behind its weights), which would make a mis-indexed target invisible. So both files get BatchNorm statistics
    recomputed on the training images (each teacher then predicts varied classes), and last.pt's classifier rows
    are permuted (the two members predict differently)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from repvit.data import build_data
    run = tmp_path_factory.mktemp("teacher") / "run"
    cfg = tiny_config("schedule.epochs=1", "run.max_steps_per_epoch=2", "ema.enabled=false")
    train(cfg, run)
    bundle = build_data(cfg.data, cfg.aug, train=True, seed=cfg.run.seed)
    images = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])

    def calibrated(sd: dict, perm: torch.Tensor | None = None) -> dict:
        m = build_model("repvit_m0_6", num_classes=10, in_chans=1)
        m.load_state_dict(sd)
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.reset_running_stats()
                mod.momentum = None                   # cumulative average over the one pass below
        with torch.no_grad():
            m.train()(images)
            if perm is not None:
                m.head.head.l.weight.copy_(m.head.head.l.weight[perm])
                m.head.head.l.bias.copy_(m.head.head.l.bias[perm])
        return {k: v.contiguous() for k, v in m.state_dict().items()}

    best = run / "best.safetensors"
    with safe_open(str(best), framework="pt") as f:
        meta = f.metadata()
    save_file(calibrated(load_file(str(best))), str(best), metadata=meta)
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    state["model"] = calibrated(state["model"], perm=torch.roll(torch.arange(10), 3))
    torch.save(state, run / "last.pt")
    return run


def _reference_teachers(run) -> dict:
    """The teacher files loaded without the library's checkpoint readers: {file name: eval-mode model}."""
    out = {}
    for name, sd in (("best.safetensors", load_file(str(run / "best.safetensors"))),
                     ("last.pt", torch.load(run / "last.pt", map_location="cpu", weights_only=True)["model"])):
        m = build_model("repvit_m0_6", num_classes=10, in_chans=1)
        m.load_state_dict(sd, strict=True)
        out[name] = m.eval()
    return out


class _Spies:
    """What the loop hands to the distillation loss, the student's training inputs, the loader's sample indices,
    and the teacher targets before/after mixup, one entry per training micro-batch."""

    def __init__(self, monkeypatch):
        import repvit.train.loop as loop
        self.loss_calls, self.inputs, self.indices, self.mixes = [], [], [], []
        spies = self

        class SpyLoss(loop.DistillationLoss):
            def forward(self, outputs, target, teacher=None, teacher_is_dist=False):
                spies.loss_calls.append((teacher.detach().clone(), teacher_is_dist))
                return super().forward(outputs, target, teacher, teacher_is_dist)

        build_student, data_loader, mix = loop.build_student, loop.DataLoader, loop._mix
        built = []

        def build(*a, **k):
            m = build_student(*a, **k)
            if not built:      # the first model built is the one trained (later: the deploy copy)
                m.register_forward_pre_hook(
                    lambda mod, args: self.inputs.append(args[0].detach().clone()) if mod.training else None)
            built.append(m)
            return m

        class Recording(data_loader):
            def __iter__(self):
                for b in super().__iter__():
                    spies.indices.append(b[2].clone())
                    yield b

        def spy_mix(mixup, x, y, num_classes, smoothing, extra=None):
            out = mix(mixup, x, y, num_classes, smoothing, extra)
            self.mixes.append((y.clone(), None if extra is None else extra.clone(), out[1].clone(),
                               None if out[2] is None else out[2].clone()))
            return out

        monkeypatch.setattr(loop, "DistillationLoss", SpyLoss)
        monkeypatch.setattr(loop, "build_student", build)
        monkeypatch.setattr(loop, "DataLoader", Recording)
        monkeypatch.setattr(loop, "_mix", spy_mix)


def _mix_lambda(y: torch.Tensor, y_mixed: torch.Tensor, smoothing: float) -> float:
    """The mixup lambda the loop used, read back from the mixed labels (lam * Y + (1 - lam) * Y.flip(0))."""
    off = smoothing / 10
    y1 = F.one_hot(y, 10).double() * (1.0 - smoothing) + off
    y2 = y1.flip(0)
    d = y1 - y2
    lam = float(((y_mixed.double() - y2) * d).sum() / (d * d).sum())
    assert torch.allclose(y_mixed.double(), lam * y1 + (1 - lam) * y2, atol=1e-6)
    return lam


@pytest.mark.parametrize("kind, precompute, ensemble", [("hard", True, False), ("soft", False, False),
                                                        ("soft", False, True)])
def test_student_distils_from_a_checkpoint_teacher(tmp_path, monkeypatch, teacher_run, kind, precompute, ensemble):
    teacher = str(teacher_run / "best.safetensors")
    if ensemble:   # the EMA weights and the final raw ones: two members
        teacher += f",{teacher_run / 'last.pt'}"
    refs = _reference_teachers(teacher_run)
    spies = _Spies(monkeypatch)
    student = tmp_path / "student"
    cfg = tiny_config(
        "schedule.epochs=1", "run.max_steps_per_epoch=2", f"distill.kind={kind}",
        f"distill.teacher={teacher}", "distill.teacher_checkpoint=null",
        f"distill.precompute={str(precompute).lower()}", "aug.mixup=0.8", "aug.cutmix=1.0")
    res = train(cfg, student)
    state = torch.load(student / "last.pt", map_location="cpu", weights_only=True)
    assert any(k.startswith("head.head_dist.") for k in state["model"])   # the student has its second head
    assert (student / "teacher_logits.pt").exists() == precompute
    row = json.loads((student / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train_loss"] > 0 and res.deploy_top1 is not None

    # two updates of one 64-image micro-batch each: two loss calls, each with its own teacher targets
    assert len(spies.loss_calls) == len(spies.mixes) == len(spies.indices) == 2
    assert all(t.shape == (64, 10) and is_dist == precompute for t, is_dist in spies.loss_calls)
    with torch.no_grad():
        if precompute:
            # the cache holds the teacher's logits of every un-augmented training image, in dataset order ...
            from repvit.data import build_data
            bundle = build_data(cfg.data, cfg.aug, train=True, seed=cfg.run.seed, num_classes=None)
            images = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
            want_logits = refs["best.safetensors"](images)
            logits = torch.load(student / "teacher_logits.pt", weights_only=True)["logits"]
            assert logits.shape == (1438, 10) and torch.isfinite(logits).all()
            torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
            for (t, _), (y, extra, y_mixed, extra_mixed), idx in zip(spies.loss_calls, spies.mixes, spies.indices):
                # ... each step takes the hard targets of its own samples (by dataset index) ...
                hard = F.one_hot(want_logits[idx].argmax(-1), 10).float()
                assert len(set(hard.argmax(-1).tolist())) >= 3     # varied targets: a wrong index would show
                assert torch.equal(extra, hard)
                # ... mixed with the labels' lambda and partner, and that is what the loss gets
                lam = _mix_lambda(y, y_mixed, cfg.aug.smoothing)
                h = hard.double()
                torch.testing.assert_close(extra_mixed.double(), lam * h + (1 - lam) * h.flip(0))
                assert torch.equal(t, extra_mixed)
        else:
            assert len(spies.inputs) == 2 and all(e is None for _, e, _, _ in spies.mixes)
            for (t, _), x in zip(spies.loss_calls, spies.inputs):   # the teacher saw the student's (mixed) batch
                outs = {n: m(x) for n, m in refs.items()}
                if ensemble:   # the log of the members' mean probability
                    want = ((F.softmax(outs["best.safetensors"], -1) + F.softmax(outs["last.pt"], -1)) / 2).log()
                    for o in outs.values():   # each member alone predicts something else: both were used
                        assert (F.log_softmax(o, -1) - want).abs().max() > 1e-2
                else:
                    want = outs["best.safetensors"]
                torch.testing.assert_close(t, want, atol=1e-4, rtol=1e-4)


def test_a_run_as_teacher_teaches_its_ema_weights(tmp_path):
    """A run's last.pt (or its directory) as distill.teacher is the model `repvit eval` scores: the EMA weights
    when the run kept them (it used to be the raw ones, so an eval ensemble did not predict what it would teach)."""
    from repvit.train.distill import build_teacher
    run = tmp_path / "run"
    train(tiny_config("schedule.epochs=1", "run.max_steps_per_epoch=2", "ema.enabled=true", "ema.decay=0.5"), run)
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert state["ema"] is not None
    differs = [k for k, v in state["ema"].items() if v.is_floating_point() and not torch.equal(v, state["model"][k])]
    assert differs                                            # raw and EMA are told apart below
    from repvit.train.builder import build_student
    cfg = tiny_config("schedule.epochs=1")

    def model_of(sd):
        m = build_student(cfg, num_classes=10, in_chans=1)
        m.load_state_dict(sd)
        return m.eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        ema_out, raw_out = model_of(state["ema"])(x), model_of(state["model"])(x)
    assert not torch.allclose(ema_out, raw_out, atol=1e-3)
    for source in (run / "last.pt", run):
        out = build_teacher(str(source), None, num_classes=10, in_chans=1)(x)
        assert torch.allclose(out, ema_out, atol=1e-4), source
