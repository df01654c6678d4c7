"""Backbones: timm creation from checkpoint files, data configs, ImageFolder, BN-safe freezing, param groups."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import timm  # a hard dependency: a missing install must fail, not skip
import torch
from torch.testing import assert_close

from reweight.backbones import (
    FreezeError,
    backbone_data_config,
    backbone_transform,
    block_groups,
    build_optimizer,
    build_scheduler,
    check_checkpoint,
    check_no_frozen_grads,
    create_backbone,
    freeze,
    freeze_all_but_last,
    freeze_report,
    frozen_bn_names,
    head_parameter_names,
    param_groups,
    resolve_selectors,
    set_trainable,
    trainable_names,
    unfreeze,
)
from reweight.errors import ConfigError, DataError


def _model(num_classes=10, in_chans=1, seed=0):
    torch.manual_seed(seed)
    return create_backbone("test_resnet", num_classes, in_chans=in_chans)


def _bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def _train_steps(model, steps=3, in_chans=1, size=16, lr=0.1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, in_chans, size, size, generator=g) * 2 + 0.5
        y = torch.randint(0, 10, (8,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        check_no_frozen_grads(model, opt)
        opt.step()
    return opt


# ---------------------------------------------------------------------------------------------
# import hygiene
# ---------------------------------------------------------------------------------------------


def test_import_is_light():
    code = ("import sys, reweight, reweight.staging, reweight.imagefolder, reweight.backbones; "
            "bad = [m for m in ('timm', 'backpack', 'higher') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# creation and checkpoints
# ---------------------------------------------------------------------------------------------


def test_unknown_model_name_lists_close_matches():
    with pytest.raises(ConfigError, match=r"must be a timm model name\. Got 'test_resnett' instead.*test_resnet"):
        create_backbone("test_resnett", 10)


def test_missing_weights_file(tmp_path):
    with pytest.raises(ConfigError, match="must be an existing file"):
        create_backbone("test_resnet", 10, in_chans=1, pretrained_file=str(tmp_path / "nope.pth"))


def test_hub_failure_is_a_clear_error(monkeypatch):
    calls = []

    def offline(name, pretrained=False, **kw):
        calls.append(pretrained)
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConfigError, match="Could not fetch hub weights for 'test_resnet'.*pass pretrained_file="):
        create_backbone("test_resnet", 10, pretrained=True)
    assert calls == [True]  # the real hub path was taken


def test_checkpoint_roundtrip_keeps_every_tensor_including_classifier(tmp_path):
    src = _model(10, 1, seed=3)
    _train_steps(src, steps=1)  # non-trivial running statistics
    f = tmp_path / "w.pth"
    torch.save(src.state_dict(), f)
    torch.manual_seed(99)  # a different random init: everything must come from the file
    dst = create_backbone("test_resnet", 10, in_chans=1, pretrained_file=str(f))
    a, b = src.state_dict(), dst.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_checkpoint_feature_mode_and_new_classifier(tmp_path):
    src = _model(10, 1, seed=3)
    f = tmp_path / "w.pth"
    torch.save({"state_dict": src.state_dict()}, f)  # nested form, as timm training scripts write it
    feat = create_backbone("test_resnet", 0, in_chans=1, pretrained_file=str(f))
    x = torch.randn(4, 1, 16, 16)
    src.eval(), feat.eval()
    out = feat(x)
    assert out.shape == (4, src.num_features)
    assert_close(out, src.forward_head(src.forward_features(x), pre_logits=True), rtol=0, atol=0)
    # another number of classes: backbone loaded, classifier re-initialised with the new size
    five = create_backbone("test_resnet", 5, in_chans=1, pretrained_file=str(f))
    assert five.fc.weight.shape == (5, src.num_features)
    assert_close(five.layer4[0].conv1.weight, src.layer4[0].conv1.weight, rtol=0, atol=0)


def test_checkpoint_input_channels_are_adapted_by_timm(tmp_path):
    src = _model(10, 3, seed=4)
    f = tmp_path / "rgb.pth"
    torch.save(src.state_dict(), f)
    gray = create_backbone("test_resnet", 10, in_chans=1, pretrained_file=str(f))
    # timm's adapt_input_conv sums the RGB filters for a one-channel stem
    assert_close(gray.conv1[0].weight, src.conv1[0].weight.sum(1, keepdim=True), rtol=1e-6, atol=1e-7)
    assert_close(gray.layer1[0].conv1.weight, src.layer1[0].conv1.weight, rtol=0, atol=0)


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    other = timm.create_model("test_efficientnet", num_classes=10, in_chans=1)
    f = tmp_path / "eff.pth"
    torch.save(other.state_dict(), f)
    with pytest.raises(ConfigError, match=r"does not match the architecture 'test_resnet'.*Missing keys: conv1\.0\.weight"):
        create_backbone("test_resnet", 10, in_chans=1, pretrained_file=str(f))


def test_checkpoint_shape_mismatch_names_expected_and_got():
    sd = _model(10, 1).state_dict()
    sd["layer4.0.conv1.weight"] = torch.zeros(7, 192, 3, 3)
    with pytest.raises(ConfigError, match=r"layer4\.0\.conv1\.weight: expected \(96, 192, 3, 3\), got \(7, 192, 3, 3\)"):
        check_checkpoint("test_resnet", sd, 10, 1)


def test_data_config_and_transform_follow_the_model():
    m = _model(10, 1)
    cfg = backbone_data_config(m)
    assert cfg["input_size"] == (1, 160, 160) and cfg["mean"] == (0.5,) and cfg["std"] == (0.5,)
    rgb = _model(10, 3)
    assert backbone_data_config(rgb, input_size=(3, 32, 32))["input_size"] == (3, 32, 32)
    from PIL import Image

    t = backbone_transform(rgb, input_size=(3, 32, 32))
    img = Image.fromarray(np.full((40, 50, 3), 255, dtype=np.uint8))
    x = t(img)
    assert x.shape == (3, 32, 32)
    assert_close(x, torch.ones_like(x), rtol=0, atol=1e-6)  # (1 - 0.5) / 0.5


# ---------------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------------


def _write_tree(root, classes=("cat", "ant", "bee"), per_class=3, size=(20, 24)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for j in range(per_class):
            arr = np.full((*size, 3), 40 * ci + j, dtype=np.uint8) + rng.integers(0, 3, (*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"img{j}.png")
    return root


def test_load_imagefolder_rgb_and_gray(tmp_path):
    from reweight.imagefolder import image_folder, load_imagefolder

    root = _write_tree(tmp_path / "tree")
    ds, classes = load_imagefolder(root, _model(3, 3), input_size=(3, 16, 16))
    assert classes == ["ant", "bee", "cat"]  # ImageFolder sorts class folders
    assert ds.images.shape == (9, 3, 16, 16) and ds.images.dtype == np.float32
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and ds.num_classes == 3
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    # class "cat" (written with intensity ~0/255) is darker than "bee" (~80/255)
    assert ds.images[ds.labels == 2].mean() < ds.images[ds.labels == 1].mean()
    gray, _ = load_imagefolder(root, _model(3, 1), input_size=(1, 16, 16))
    assert gray.images.shape == (9, 1, 16, 16)
    tv = image_folder(root, _model(3, 1), input_size=(1, 16, 16))
    x, y = tv[0]
    assert x.shape == (1, 16, 16) and y == 0
    # and it plugs into the staged pipeline like an embedded dataset
    from reweight.config import DataConfig
    from reweight.staging import staged_data

    big, _ = load_imagefolder(_write_tree(tmp_path / "big", per_class=10), _model(3, 3), input_size=(3, 16, 16))
    sd = staged_data(DataConfig(dataset="digits", val_fraction=0.2, test_fraction=0.2, noise_rate=0.2), 0, dataset=big)
    assert sd.x_train.shape[1:] == (3, 16, 16) and sd.num_classes == 3


def test_imagefolder_bad_tree(tmp_path):
    from reweight.imagefolder import image_folder, load_imagefolder

    with pytest.raises(DataError, match="must be an existing directory"):
        load_imagefolder(tmp_path / "missing", _model(3, 3))
    (tmp_path / "only").mkdir()
    _write_tree(tmp_path / "only" / "x", classes=("a",))
    with pytest.raises(DataError, match="at least 2 class folders"):
        load_imagefolder(tmp_path / "only" / "x", _model(3, 3))
    root = _write_tree(tmp_path / "ok")
    with pytest.raises(DataError, match="must be a timm model when no 'transform' is given"):
        image_folder(root)


# ---------------------------------------------------------------------------------------------
# selectors
# ---------------------------------------------------------------------------------------------


def test_selectors_use_timm_groups():
    m = _model()
    names = [n for n, _ in m.named_parameters()]
    assert head_parameter_names(m) == ["fc.weight", "fc.bias"]
    assert resolve_selectors(m, ["head"]) == ["fc.weight", "fc.bias"]
    layer4 = [n for n in names if n.startswith("layer4.")]
    assert resolve_selectors(m, ["last:1"]) == layer4
    assert resolve_selectors(m, ["layer4"]) == layer4  # module-prefix glob
    assert resolve_selectors(m, [r"re:^layer4\."]) == layer4
    assert resolve_selectors(m, ["stage:-1"]) == layer4
    assert resolve_selectors(m, ["group:0"]) == [n for n in names if n.startswith(("conv1.", "bn1."))]
    groups = block_groups(m)
    assert len(groups) == 5 and sum(map(len, groups)) + 2 == len(names)  # stem + 4 blocks + head
    assert resolve_selectors(m, ["all"]) == names
    assert resolve_selectors(m, ["last:2"]) == [n for n in names if n.startswith(("layer3.", "layer4."))]


@pytest.mark.parametrize("sel, match", [
    ("layer9", "Selector 'layer9' matches no parameter .*Valid selectors.*top-level modules with parameters: bn1, conv1"),
    ("last:9", r"must ask for 1\.\.5 blocks"),
    ("group:7", r"must index one of 5 block groups"),
    ("last:x", r"must be last:<int>"),
    ("re:(", "not a valid regular expression"),
])
def test_bad_selectors(sel, match):
    with pytest.raises(ConfigError, match=match):
        resolve_selectors(_model(), [sel])


def test_nothing_trainable_is_an_error():
    m = _model()
    with pytest.raises(ConfigError, match="leaves nothing trainable.*Expected at least one trainable parameter"):
        set_trainable(m, ["head"], frozen=["fc"])
    feat = create_backbone("test_resnet", 0, in_chans=1)
    with pytest.raises(ConfigError, match="Selector 'head' matches no parameter"):
        set_trainable(feat, ["head"])


# ---------------------------------------------------------------------------------------------
# BN-safe freezing
# ---------------------------------------------------------------------------------------------


def test_frozen_bn_running_stats_are_bit_identical_in_train_mode():
    m = _model()
    _train_steps(m, steps=1)  # statistics away from their init values
    set_trainable(m, ["head", "last:1"])
    frozen_keys = [k for k in _bn_stats(m) if not k.startswith("layer4.")]
    before = _bn_stats(m)
    w_before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()  # a .train() call must not re-enable running-stat updates
    _train_steps(m, steps=3)
    m.train(True)
    _train_steps(m, steps=1)
    after = _bn_stats(m)
    for k in frozen_keys:
        assert torch.equal(after[k], before[k]), k
    # the trainable block's BN does update (so the check above is not vacuous) ...
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("layer4."))
    # ... and frozen BN affine parameters (now FrozenBatchNorm2d buffers) did not move either
    sd = m.state_dict()
    assert torch.equal(sd["bn1.weight"], w_before["bn1.weight"]) and torch.equal(sd["layer1.0.bn2.bias"], w_before["layer1.0.bn2.bias"])
    assert "bn1" in frozen_bn_names(m) and not any(n.startswith("layer4") for n in frozen_bn_names(m))


def test_without_bn_handling_frozen_stats_drift():
    """The failure mode of DESIGN section 3: requires_grad=False alone does not stop BN statistics."""
    m = _model()
    set_trainable(m, ["head"], bn="train")
    before = _bn_stats(m)
    _train_steps(m, steps=2)
    after = _bn_stats(m)
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])


def test_fully_frozen_model_is_identical_in_train_and_eval_mode():
    m = _model()
    _train_steps(m, steps=1)
    set_trainable(m, ["head"])
    x = torch.randn(6, 1, 16, 16)
    m.train()
    out_train = m(x)
    m.eval()
    assert_close(out_train, m(x), rtol=0, atol=0)


def test_bn_eval_mode_locks_trainable_bn_statistics_but_trains_affine():
    m = _model()
    set_trainable(m, ["head", "last:1"], bn="eval")
    before = _bn_stats(m)
    w = m.layer4[0].downsample[2].weight.detach().clone()  # (bn1 gets no gradient at first: timm zero-inits bn2)
    m.train()
    _train_steps(m, steps=2)
    after = _bn_stats(m)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(m.layer4[0].downsample[2].weight.detach(), w)
    # switching the stage back to bn="frozen" removes the lock
    set_trainable(m, ["head", "last:1"], bn="frozen")
    _train_steps(m, steps=1)
    assert not torch.equal(_bn_stats(m)["layer4.0.bn1.running_mean"], before["layer4.0.bn1.running_mean"])


def test_no_gradient_reaches_frozen_parameters_and_the_check_can_fail():
    m = _model()
    freeze_all_but_last(m, 1)
    opt = _train_steps(m, steps=1)
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    m.layer1[0].conv1.weight.grad = torch.zeros_like(m.layer1[0].conv1.weight)
    with pytest.raises(FreezeError, match=r"Gradient reached frozen parameter\(s\): layer1\.0\.conv1\.weight"):
        check_no_frozen_grads(m)
    m.layer1[0].conv1.weight.grad = None
    unfreeze(m, ["layer3"])  # the old optimizer now misses layer3
    with pytest.raises(FreezeError, match="does not hold exactly the trainable parameters.*missing.*layer3"):
        check_no_frozen_grads(m, opt)


def test_incremental_freeze_unfreeze_and_report():
    m = _model()
    total = sum(p.numel() for p in m.parameters())
    r = freeze_all_but_last(m, 1)
    assert set(trainable_names(m)) == set(resolve_selectors(_model(), ["last:1", "head"]))
    assert r.trainable + r.frozen == total
    r = unfreeze(m, ["layer3"])
    assert {n.split(".")[0] for n in trainable_names(m)} == {"layer3", "layer4", "fc"}
    assert r.trainable + r.frozen == total
    r = freeze(m, ["layer4"])
    assert {n.split(".")[0] for n in trainable_names(m)} == {"layer3", "fc"}
    rows = {row["module"]: row for row in freeze_report(m).rows}
    assert rows["layer4"]["trainable"] == 0 and rows["layer4"]["frozen_bn"] == 3
    assert rows["fc"]["trainable"] == 970 and rows["fc"]["frozen"] == 0
    assert freeze_report(m).trainable + freeze_report(m).frozen == total
    assert "total" in freeze_report(m).format()


# ---------------------------------------------------------------------------------------------
# optimizer hygiene
# ---------------------------------------------------------------------------------------------


def test_param_groups_lr_is_base_times_multiplier_and_decay_only_where_configured():
    m = _model()
    set_trainable(m, ["head", "last:2"])
    groups = param_groups(m, 0.01, {"head": 1.0, "layer4": 0.2, "last:2": 0.05}, weight_decay=1e-3)
    seen = {}
    for g in groups:
        for n in g["names"]:
            seen[n] = (g["lr"], g["weight_decay"])
    for n, p in m.named_parameters():
        if not p.requires_grad:
            assert n not in seen
            continue
        mult = 1.0 if n.startswith("fc.") else 0.2 if n.startswith("layer4.") else 0.05  # first match wins
        assert seen[n][0] == pytest.approx(0.01 * mult, rel=1e-15)
        assert seen[n][1] == (1e-3 if p.ndim >= 2 else 0.0), n
    opt = build_optimizer(groups, "sgd")
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    check_no_frozen_grads(m, opt)
    with_nb = param_groups(m, 0.01, weight_decay=1e-3, decay_norm_bias=True)
    assert {g["weight_decay"] for g in with_nb} == {1e-3}


def test_cosine_schedule_keeps_multiplier_ratios():
    m = _model()
    set_trainable(m, ["head", "last:1"])
    opt = build_optimizer(param_groups(m, 0.1, {"last:1": 0.25}), "adamw")
    sched = build_scheduler(opt, "cosine", 4)
    for _ in range(2):
        opt.step()
        sched.step()
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[0] == pytest.approx(0.1 * 0.5, rel=1e-12) and lrs[1] == pytest.approx(0.025 * 0.5, rel=1e-12)


@pytest.mark.parametrize("kw, match", [
    (dict(lr=0.0), "The 'lr' parameter of param_groups must be > 0"),
    (dict(lr=0.1, lr_mult={"head": -1.0}), "The lr multiplier of 'head' must be a finite number >= 0"),
    (dict(lr=0.1, lr_mult={"nothing": 0.5}), "Selector 'nothing' matches no parameter"),
    (dict(lr=0.1, weight_decay=-1.0), "The 'weight_decay' parameter of param_groups must be >= 0"),
])
def test_param_groups_bad_input(kw, match):
    with pytest.raises(ConfigError, match=match):
        param_groups(_model(), **kw)


def test_bad_optimizer_scheduler_and_bn_mode():
    m = _model()
    with pytest.raises(ConfigError, match="The 'kind' parameter of build_optimizer"):
        build_optimizer(param_groups(m, 0.1), "adam")
    with pytest.raises(ConfigError, match="The 'kind' parameter of build_scheduler"):
        build_scheduler(build_optimizer(param_groups(m, 0.1)), "step")
    with pytest.raises(ConfigError, match="The 'bn' parameter of set_trainable"):
        set_trainable(m, ["all"], bn="off")


# ---------------------------------------------------------------------------------------------
# the package layout
# ---------------------------------------------------------------------------------------------


def test_every_public_name_of_the_submodules_is_reexported():
    import importlib

    import reweight.backbones as bb

    # (the package attribute ``freeze`` is the function; the submodule is reached by its full name)
    mods = [importlib.import_module(f"reweight.backbones.{m}") for m in ("create", "freeze", "optim", "train")]
    for mod in mods:
        assert mod.__all__ == sorted(mod.__all__), mod.__name__
        for name in mod.__all__:
            assert getattr(bb, name) is getattr(mod, name) and name in bb.__all__, (mod.__name__, name)
    assert bb.__all__ == sorted(bb.__all__)
    assert set(bb.__all__) == {n for mod in mods for n in mod.__all__}


# ---------------------------------------------------------------------------------------------
# the one training loop
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    from reweight.config import DataConfig
    from reweight.staging import staged_data

    return staged_data(DataConfig(dataset="digits", noise_rate=0.4), 0)


def _former_warmup(model, xt, yt, xv, yv, epochs, patience, batch_size, lr, weight_decay, seed, min_epochs):
    """The dedicated warm-up loop that train_stage replaced (reweight/backbones.py before issue 11), verbatim."""
    import copy

    from reweight.seeding import torch_generator

    g = torch_generator(seed, "warmup")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    best_acc, best_state, bad, history = -1.0, copy.deepcopy(model.state_dict()), 0, []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(xt.shape[0], generator=g)
        total, count = 0.0, 0
        for i in range(0, xt.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
            count += idx.numel()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(xv[i:i + 4 * batch_size]).argmax(1) == yv[i:i + 4 * batch_size]).sum())
                          for i in range(0, xv.shape[0], 4 * batch_size))
        acc = correct / max(1, xv.shape[0])
        history.append({"epoch": epoch, "train_loss": total / count, "val_acc": acc})
        if acc > best_acc:
            best_acc, best_state, bad = acc, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= patience and epoch + 1 >= min_epochs:
                break
    model.load_state_dict(best_state)
    return history


def test_warmup_through_the_one_loop_is_the_former_warmup_bit_for_bit(digits):
    from reweight.backbones import warmup
    from reweight.config import BackboneConfig

    bc = BackboneConfig(epochs=10, patience=1, min_epochs=3, batch_size=32, lr=2e-3, weight_decay=1e-4)
    xt, yt, xv, yv = digits.x_train[:300], digits.y_train[:300], digits.x_val, digits.y_val
    twin = _model(10, 1, seed=5)
    expected = _former_warmup(twin, xt, yt, xv, yv, bc.epochs, bc.patience, bc.batch_size, bc.lr, bc.weight_decay,
                              seed=3, min_epochs=bc.min_epochs)
    m = _model(10, 1, seed=5)
    out = warmup(m, bc, (xt, yt), (xv, yv), seed=3)
    assert [{k: h[k] for k in ("epoch", "train_loss", "val_acc")} for h in out.history] == expected
    # the schedule exercised early stopping: an epoch without progress before min_epochs did not stop
    # it (epoch 1 repeats epoch 0's accuracy), a later one did, and an earlier epoch was restored
    accs = [h["val_acc"] for h in expected]
    assert accs[1] <= accs[0] and len(expected) < bc.epochs and out.stopped_early
    assert out.best_epoch == int(np.argmax(accs)) < len(expected) - 1
    a, b = twin.state_dict(), m.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert all(h["lr"] == [bc.lr] for h in out.history)
    # every parameter (biases and norm weights too) carries the warm-up's weight decay, as before
    assert [g["weight_decay"] for g in out.setup.optimizer.param_groups] == [bc.weight_decay]


def test_stage_with_patience_stops_early_and_restores_the_best_epoch(digits):
    from reweight.backbones import train_stage
    from reweight.config import StageConfig

    xt, yt, xv, yv = digits.x_train[:96], digits.y_train[:96], digits.x_val, digits.y_val

    def run(epochs, patience=None, min_epochs=0, restore_best=True):
        m = _model(10, 1, seed=2)
        # head only at a tiny lr: validation accuracy cannot improve after epoch 0, the weights still move
        st = StageConfig(name="s", trainable=["head"], lr=1e-9, epochs=epochs, patience=patience,
                         min_epochs=min_epochs, restore_best=restore_best)
        out = train_stage(m, st, (xt, yt), (xv, yv), batch_size=32, eval_batch_size=64,
                          generator=torch.Generator().manual_seed(0))
        return m, out

    m, out = run(10, patience=2)
    accs = [h["val_acc"] for h in out.history]
    assert accs == [accs[0]] * len(accs)  # the premise: no epoch beats epoch 0
    assert len(out.history) == 3 and out.stopped_early and out.best_epoch == 0  # epoch 0, then 2 without progress
    _, late = run(10, patience=2, min_epochs=5)
    assert len(late.history) == 5 and late.stopped_early  # min_epochs holds the stop back
    _, full = run(4)
    assert len(full.history) == 4 and not full.stopped_early  # patience None: every epoch runs
    one, _ = run(1)
    last, _ = run(3, patience=2, restore_best=False)
    for k, v in one.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k  # restored: the weights after epoch 0
    assert not torch.equal(last.fc.weight, one.fc.weight)  # without restore_best the later epochs stay


def test_train_stage_bad_inputs(digits):
    from reweight.backbones import train_stage
    from reweight.config import StageConfig

    st = StageConfig(name="s", trainable=["head"], epochs=1)
    data = ((digits.x_train[:8], digits.y_train[:8]), (digits.x_val[:8], digits.y_val[:8]))
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ConfigError, match=r"The 'batch_size' parameter of train_stage must be an int >= 1\. Got 0"):
        train_stage(_model(), st, *data, batch_size=0, eval_batch_size=8, generator=g)
    with pytest.raises(ConfigError, match=r"The 'eval_batch_size' parameter of train_stage must be an int >= 1"):
        train_stage(_model(), st, *data, batch_size=4, eval_batch_size=2.5, generator=g)
    with pytest.raises(ConfigError, match=r"The sample weights of stage 's' must have shape \(8,\)\. Got \(7,\)"):
        train_stage(_model(), st, *data, batch_size=4, eval_batch_size=8, generator=g, sample_weights=torch.ones(7))
    with pytest.raises(ConfigError, match=r"The 'stages\[s\]\.patience' parameter must be None or >= 1\. Got 0"):
        StageConfig(name="s", patience=0)
