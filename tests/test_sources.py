"""User data through `carrot run`: image folders, embeddings, local torchvision roots, labels files, export.

Every format is written to disk in its exact layout (a few 8x8 PNGs per class, tiny npz/pt/csv files,
fake torchvision roots as torchvision writes them), then run end to end with a tiny backbone budget.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.cli import main
from reweight.config import DataConfig, load_config
from reweight.errors import ConfigError, DataError, WarmupError
from reweight.runs import load_checked
from reweight.sources import TORCHVISION_FILES, load_source

CLASSES = ("ant", "bee", "cat")
TINY = ["--quiet", "backbone.epochs=1", "backbone.allow_chance=true", "outer.steps=2", "outer.checkpoint_every=1"]


# ---------------------------------------------------------------------------------------------
# writers: each format in its exact on-disk layout
# ---------------------------------------------------------------------------------------------


def write_tree(root: Path, per_class: int = 6, classes=CLASSES, size: int = 8, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            arr = (np.full((size, size, 3), 70 * ci) + rng.integers(0, 40, (size, size, 3))).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{c}{j:02d}.png")
    return root


def image_folders(base: Path, test: bool = True):
    out = {"train": write_tree(base / "train", 8, seed=0), "trusted": write_tree(base / "trusted", 3, seed=1)}
    if test:
        out["test"] = write_tree(base / "test", 2, seed=2)
    return out


def _rgb(n: int, K: int, rng, h: int = 32, w: int = 32, c: int = 3):
    y = np.arange(n) % K
    x = (rng.integers(0, 60, (n, c, h, w)) + (y * (190 // max(K - 1, 1)))[:, None, None, None]).astype(np.uint8)
    return x, y


def write_torchvision(root: Path, name: str, per_class: int = 4, test_per_class: int = 1, seed: int = 0) -> Path:
    """A tiny copy of torchvision dataset ``name`` in the layout torchvision(root, download=True) leaves."""
    rng = np.random.default_rng(seed)
    train_f, test_f, meta_f = TORCHVISION_FILES[name]
    K = 100 if name == "CIFAR100" else 10
    xtr, ytr = _rgb(per_class * K, K, rng, c=1 if "MNIST" in name else 3,
                    h=28 if "MNIST" in name else 32, w=28 if "MNIST" in name else 32)
    xte, yte = _rgb(test_per_class * K, K, rng, c=xtr.shape[1], h=xtr.shape[2], w=xtr.shape[3])
    for f in train_f + test_f + ((meta_f,) if meta_f else ()):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
    if name in ("CIFAR10", "CIFAR100"):
        key = "labels" if name == "CIFAR10" else "fine_labels"
        chunks = np.array_split(np.arange(len(ytr)), len(train_f))
        for f, idx in zip(train_f, chunks):
            d = {"batch_label": f, key: ytr[idx].tolist(), "data": xtr[idx].reshape(len(idx), -1),
                 "filenames": [f"{i}.png" for i in idx]}
            if name == "CIFAR100":
                d["coarse_labels"] = (ytr[idx] // 5).tolist()
            (root / f).write_bytes(pickle.dumps(d, protocol=2))
        d = {"batch_label": "test", key: yte.tolist(), "data": xte.reshape(len(yte), -1)}
        if name == "CIFAR100":
            d["coarse_labels"] = (yte // 5).tolist()
        (root / test_f[0]).write_bytes(pickle.dumps(d, protocol=2))
        meta = ({"label_names": [f"c{i}" for i in range(K)], "num_cases_per_batch": 10000, "num_vis": 3072}
                if name == "CIFAR10" else {"fine_label_names": [f"f{i}" for i in range(K)],
                                           "coarse_label_names": [f"g{i}" for i in range(20)]})
        (root / meta_f).write_bytes(pickle.dumps(meta, protocol=2))
    elif "MNIST" in name:
        def idx(a: np.ndarray) -> bytes:
            return bytes([0, 0, 8, a.ndim]) + np.asarray(a.shape, dtype=">i4").tobytes() + a.astype(np.uint8).tobytes()

        for f, a in zip(train_f + test_f, (xtr[:, 0], ytr, xte[:, 0], yte)):
            (root / f).write_bytes(idx(a))
    else:  # SVHN: .mat with X (32, 32, 3, N) and y (N, 1), digit 0 stored as 10
        import scipy.io

        for f, (x, y) in zip(train_f + test_f, ((xtr, ytr), (xte, yte))):
            scipy.io.savemat(root / f, {"X": np.transpose(x, (2, 3, 1, 0)),
                                        "y": np.where(y == 0, 10, y).reshape(-1, 1).astype(np.uint8)})
    return root


def write_embeddings(base: Path, fmt: str, n: int = 30, m: int = 9, d: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    base.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, size in (("train", n), ("trusted", m), ("test", m)):
        y = np.arange(size) % 3
        X = (rng.normal(size=(size, d)) + 2.0 * y[:, None]).astype(np.float32)
        ids = [f"{role}-{i:03d}" for i in range(size)]
        p = base / f"{role}.{fmt}"
        if fmt == "npz":
            np.savez(p, features=X, labels=y, ids=np.asarray(ids))
        elif fmt == "pt":
            torch.save({"features": torch.from_numpy(X), "labels": torch.from_numpy(y), "ids": ids}, p)
        else:
            import pandas as pd

            df = pd.DataFrame(X, columns=[f"f{j}" for j in range(d)])
            df.insert(0, "id", ids)
            df["label"] = [CLASSES[c] for c in y]  # class names
            df.to_csv(p, index=False) if fmt == "csv" else df.to_parquet(p, index=False)
        paths[role] = p
    return paths


def run_args(tmp: Path, name: str, *extra: str):
    return ["run", *TINY, f"out_dir={tmp / 'runs'}", f"features.cache_dir={tmp / 'cache'}", f"name={name}", *extra]


def folder_args(f):
    args = ["data.dataset=imagefolder", f"data.train_dir={f['train']}", f"data.trusted_dir={f['trusted']}",
            "data.image_size=8"]
    return args + ([f"data.test_dir={f['test']}"] if "test" in f else [])


# ---------------------------------------------------------------------------------------------
# end to end, per source
# ---------------------------------------------------------------------------------------------


def test_imagefolder_end_to_end_and_export_maps_every_weight_to_its_file(tmp_path, capsys):
    f = image_folders(tmp_path)
    assert main(run_args(tmp_path, "if", *folder_args(f), "data.noise=none", "device=auto")) == 0
    d = tmp_path / "runs" / "if"
    s = json.loads((d / "summary.json").read_text())
    assert s["dataset"] == "imagefolder" and s["n_train"] == 24 and s["n_val"] == 9 and s["n_test"] == 6
    assert s["auroc"] is None and s["mean_weight_corrupted"] is None  # no synthetic noise: truth unknown
    assert s["device"] == "cpu" and json.loads((d / "env.json").read_text())["device"] == "cpu"
    assert set(s["identity"]) == {"data.content_sha256"}
    capsys.readouterr()
    assert main(["weights", "export", str(d), "--out", str(tmp_path / "w.csv")]) == 0
    import pandas as pd

    df = pd.read_csv(tmp_path / "w.csv")
    assert list(df.columns) == ["index", "id", "label", "alpha"]  # no corrupted column: unknown
    files = sorted(p.relative_to(f["train"]).as_posix() for p in f["train"].rglob("*.png"))
    assert sorted(df["id"]) == files
    for _, row in df.iterrows():  # the label of every row is the class folder of its file
        assert CLASSES[row["label"]] == row["id"].split("/")[0]
        assert (f["train"] / row["id"]).is_file()
    w = load_checked(d / "weights.pt")
    np.testing.assert_allclose(df["alpha"].to_numpy(), w["alpha"].double().numpy(), rtol=1e-8)
    capsys.readouterr()
    assert main(["runs", "list", str(tmp_path / "runs")]) == 0
    assert "auroc unknown" in capsys.readouterr().out
    assert main(["weights", "export", str(tmp_path)]) == 2
    assert "No weights.pt" in capsys.readouterr().err


def test_imagefolder_without_test_dir_splits_the_training_folder(tmp_path):
    f = image_folders(tmp_path, test=False)
    assert main(run_args(tmp_path, "nt", *folder_args(f), "data.test_fraction=0.25")) == 0
    s = json.loads((tmp_path / "runs" / "nt" / "summary.json").read_text())
    assert s["n_test"] == 6 and s["n_train"] == 18  # 2 of 8 per class split off as test
    w = load_checked(tmp_path / "runs" / "nt" / "weights.pt")
    assert len(set(w["ids"])) == 18 and w["corrupted"] is not None  # synthetic noise: truth known
    assert 0 <= s["auroc"] <= 1


@pytest.mark.parametrize("fmt", ["npz", "pt", "csv", "parquet"])
def test_embeddings_end_to_end_without_a_backbone(tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    p = write_embeddings(tmp_path, fmt)
    args = ["data.dataset=embeddings", f"data.train_file={p['train']}", f"data.trusted_file={p['trusted']}",
            f"data.test_file={p['test']}", "backbone.model=no_such_model"]  # never built
    assert main(run_args(tmp_path, fmt, *args)) == 0
    d = tmp_path / "runs" / fmt
    s = json.loads((d / "summary.json").read_text())
    assert s["n_train"] == 30 and s["feature_dim"] == 5 and s["warmup_best_val_acc"] is None
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing to cache
    assert main(["weights", "export", str(d)]) == 0
    import pandas as pd

    df = pd.read_csv(d / "weights.csv")
    assert sorted(df["id"]) == [f"train-{i:03d}" for i in range(30)]
    np.testing.assert_array_equal(df["clean_label"].to_numpy(), df["index"].to_numpy() % 3)  # rows written i % 3
    assert (d / "weights.parquet").is_file() == (importlib.util.find_spec("pyarrow") is not None)
    assert df["corrupted"].dtype == bool and df["corrupted"].any()  # synthetic noise (main.yaml): known
    np.testing.assert_array_equal(df["corrupted"], df["label"] != df["clean_label"])


@pytest.mark.parametrize("name", list(TORCHVISION_FILES))
def test_torchvision_root_end_to_end(tmp_path, name):
    root = write_torchvision(tmp_path / "tv", name, per_class=4 if name != "CIFAR100" else 3)
    # ~1 trusted image per class: nothing to hold out, so no guard
    args = ["data.dataset=torchvision", f"data.name={name}", f"data.root={root}", "data.val_fraction=0.3",
            "guard.mode=off", "data.noise=none"]
    assert main(run_args(tmp_path, name, *args)) == 0
    s = json.loads((tmp_path / "runs" / name / "summary.json").read_text())
    K = 100 if name == "CIFAR100" else 10
    assert s["n_test"] == K  # the official test split
    assert s["n_train"] + s["n_val"] == (4 if K == 10 else 3) * K  # the trusted pool comes out of train
    w = load_checked(tmp_path / "runs" / name / "weights.pt")
    assert [int(i) for i in w["ids"]] == w["train_index"].tolist()  # ids: positions in the official train split


@pytest.mark.parametrize("name", list(TORCHVISION_FILES))
def test_torchvision_reader_matches_torchvision(tmp_path, name, monkeypatch):
    """Our reader of the on-disk layout against torchvision's own dataset class (integrity checks bypassed:
    the tiny fake files cannot match the real md5 sums)."""
    import torchvision.datasets as tvd

    root = write_torchvision(tmp_path, name, per_class=2)
    src = load_source(DataConfig(dataset="torchvision", name=name, root=str(root), noise="none"), _backbone())
    cls = getattr(tvd, name)
    if name in ("CIFAR10", "CIFAR100"):
        import torchvision.datasets.cifar as cifar

        monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
        ref = [cls(str(root), train=t, download=False) for t in (True, False)]
        data, targets = [r.data for r in ref], [np.asarray(r.targets) for r in ref]
        data = [np.transpose(x, (0, 3, 1, 2)) for x in data]  # torchvision keeps (N, H, W, C)
    elif name == "SVHN":
        import torchvision.datasets.svhn as svhn

        monkeypatch.setattr(svhn.SVHN, "_check_integrity", lambda self: True)
        ref = [cls(str(root), split=sp, download=False) for sp in ("train", "test")]
        data, targets = [r.data for r in ref], [np.asarray(r.labels) for r in ref]
    else:
        ref = [cls(str(root), train=t, download=False) for t in (True, False)]
        data, targets = [r.data.numpy()[:, None] for r in ref], [r.targets.numpy() for r in ref]
    expect_x = np.concatenate(data).astype(np.float32) / 255.0
    np.testing.assert_array_equal(src.x, expect_x)
    np.testing.assert_array_equal(src.labels, np.concatenate(targets))
    assert src.n_train == len(targets[0])


def _backbone():
    from reweight.config import BackboneConfig

    return BackboneConfig(model="test_resnet")


def test_labels_files_replace_training_labels(tmp_path):
    root = write_torchvision(tmp_path / "tv", "CIFAR10", per_class=8)
    n = 80
    official = np.arange(n) % 10  # the writer's label order
    noisy = official.copy()
    noisy[::4] = (official[::4] + 1) % 10  # a quarter flipped; every class keeps samples
    # CIFAR-10N style: a .pt dict of numpy arrays with the clean labels beside the human ones
    torch.save({"clean_label": official, "worse_label": noisy}, tmp_path / "c10n.pt")
    np.save(tmp_path / "noisy.npy", noisy)
    base = ["data.dataset=torchvision", "data.name=CIFAR10", f"data.root={root}", "data.val_fraction=0.3",
            "data.noise=none"]
    assert main(run_args(tmp_path, "n", *base, f"data.labels_file={tmp_path / 'c10n.pt'}",
                         "data.labels_key=worse_label", "data.clean_labels_key=clean_label")) == 0
    w = load_checked(tmp_path / "runs" / "n" / "weights.pt")
    idx = w["train_index"].numpy()
    np.testing.assert_array_equal(w["labels"].numpy(), noisy[idx])
    np.testing.assert_array_equal(w["corrupted"].numpy(), noisy[idx] != official[idx])
    s = json.loads((tmp_path / "runs" / "n" / "summary.json").read_text())
    assert set(s["identity"]) == {"data.content_sha256", "data.labels_file_sha256"}
    assert main(run_args(tmp_path, "npy", *base, f"data.labels_file={tmp_path / 'noisy.npy'}")) == 0
    w = load_checked(tmp_path / "runs" / "npy" / "weights.pt")
    np.testing.assert_array_equal(w["labels"].numpy(), noisy[w["train_index"].numpy()])
    assert w["corrupted"] is None  # no clean labels in the file: unknown
    np.save(tmp_path / "noisy.npy", official)  # the labels file changed in place: the run name is refused
    assert main(run_args(tmp_path, "npy", *base, f"data.labels_file={tmp_path / 'noisy.npy'}")) == 2
    assert not (tmp_path / "runs" / "npy" / "FAILED").exists()  # refused before any work
    # image folder + a .csv matched by id, labels as class names
    f = image_folders(tmp_path / "if")
    import pandas as pd

    files = sorted(p.relative_to(f["train"]).as_posix() for p in f["train"].rglob("*.png"))
    given = ["bee" if i % 4 == 0 else p.split("/")[0] for i, p in enumerate(files)]
    pd.DataFrame({"id": files[::-1], "label": given[::-1]}).to_csv(tmp_path / "labels.csv", index=False)
    assert main(run_args(tmp_path, "csv", *folder_args(f), "data.noise=none",
                         f"data.labels_file={tmp_path / 'labels.csv'}")) == 0
    df = __import__("reweight.export", fromlist=["weights_table"]).weights_table(tmp_path / "runs" / "csv")
    by_id = dict(zip(files, given))
    assert all(CLASSES[r.label] == by_id[r.id] for r in df.itertuples())


# ---------------------------------------------------------------------------------------------
# identity and caches keyed on content
# ---------------------------------------------------------------------------------------------


def test_same_name_on_other_content_is_refused_naming_the_keys(tmp_path, capsys):
    f = image_folders(tmp_path)
    args = run_args(tmp_path, "same", *folder_args(f))
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 0  # same content: resumes
    assert json.loads((tmp_path / "runs" / "same" / "summary.json").read_text())["resumed_from"] == 2
    write_tree(f["train"], 8, seed=5)  # same file names and sizes, other pixels
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "data.content_sha256" in err and err.count("\n") == 1
    assert main(args + ["--overwrite"]) == 0
    # a labels file and backbone weights enter the identity too
    from reweight.backbones import create_backbone

    torch.save(create_backbone("test_resnet", 3).state_dict(), tmp_path / "w.pth")
    args = run_args(tmp_path, "wts", *folder_args(f), f"backbone.pretrained_file={tmp_path / 'w.pth'}")
    assert main(args) == 0
    torch.manual_seed(1)
    torch.save(create_backbone("test_resnet", 3).state_dict(), tmp_path / "w.pth")  # replaced in place
    capsys.readouterr()
    assert main(args) == 2
    assert "backbone.weights_sha256" in capsys.readouterr().err


def test_backbone_weights_replaced_in_place_miss_the_feature_cache(tmp_path):
    from reweight.backbones import create_backbone
    from reweight.config import BackboneConfig, FeatureConfig
    from reweight.features import build_features

    f = image_folders(tmp_path)
    data = DataConfig(dataset="imagefolder", train_dir=str(f["train"]), trusted_dir=str(f["trusted"]),
                      test_dir=str(f["test"]), image_size=8, noise="none")
    wfile = tmp_path / "w.pth"
    bb = BackboneConfig(model="test_resnet", pretrained_file=str(wfile), epochs=0)
    feats = FeatureConfig(cache_dir=str(tmp_path / "cache"))
    torch.manual_seed(0)
    torch.save(create_backbone("test_resnet", 3).state_dict(), wfile)
    a = build_features(data, bb, feats, 0)
    assert a.meta["cache_hit"] is False and build_features(data, bb, feats, 0).meta["cache_hit"] is True
    torch.manual_seed(1)
    torch.save(create_backbone("test_resnet", 3).state_dict(), wfile)  # same path, other content
    b = build_features(data, bb, feats, 0)
    assert b.meta["cache_hit"] is False
    assert a.meta["provenance"]["backbone_weights_sha256"] != b.meta["provenance"]["backbone_weights_sha256"]
    assert not torch.equal(a.X_train, b.X_train)


# ---------------------------------------------------------------------------------------------
# bad files: one clear error before any work
# ---------------------------------------------------------------------------------------------


def _bad_cases(tmp: Path):
    """(name, config overrides, error class, message pattern) for every bad-file family."""
    cases = []
    f = image_folders(tmp / "corrupt")
    (f["train"] / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    cases.append(("corrupt image", folder_args(f), DataError, r"broken\.png' cannot be read"))
    f = image_folders(tmp / "empty")
    (f["train"] / "dog").mkdir()
    cases.append(("empty class folder", folder_args(f), DataError, r"class folder .*dog.* holds no image"))
    f = image_folders(tmp / "lacking")
    import shutil

    shutil.rmtree(f["trusted"] / "cat")
    cases.append(("trusted set lacks a class", folder_args(f), DataError, r"trusted set .* lacks class\(es\) \['cat'\]"))
    f = image_folders(tmp / "range")
    n = len(list(f["train"].rglob("*.png")))
    np.save(tmp / "range.npy", np.full(n, 7))
    cases.append(("label out of range (labels file)", folder_args(f) + [f"data.labels_file={tmp / 'range.npy'}",
                                                                       "data.noise=none"],
                  DataError, r"must be in 0\.\.2\. Got label 7, out of range"))
    p = write_embeddings(tmp / "emb_range", "npz")
    np.savez(p["trusted"], features=np.zeros((3, 5), np.float32), labels=np.array([0, 1, 9]))
    cases.append(("label out of range (embeddings)", ["data.dataset=embeddings", f"data.train_file={p['train']}",
                                                      f"data.trusted_file={p['trusted']}"],
                  DataError, r"must be in 0\.\.2 .*Got label 9, out of range"))
    p = write_embeddings(tmp / "emb_len", "npz")
    np.savez(p["train"], features=np.zeros((30, 5), np.float32), labels=np.arange(29) % 3)
    cases.append(("features and labels of different lengths", ["data.dataset=embeddings",
                                                                f"data.train_file={p['train']}",
                                                                f"data.trusted_file={p['trusted']}"],
                  DataError, r"30 feature rows but 29 labels"))
    root = write_torchvision(tmp / "tv", "CIFAR10", per_class=2)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    cases.append(("missing torchvision file", ["data.dataset=torchvision", "data.name=CIFAR10", f"data.root={root}"],
                  DataError, r"files are missing .*cifar-10-batches-py/data_batch_3.*never downloads"))
    return cases


def test_every_bad_file_is_one_clear_error_before_any_work(tmp_path, capsys):
    for name, args, exc, pattern in _bad_cases(tmp_path):
        cfg = load_config(None, args)
        with pytest.raises(exc, match=pattern):
            load_source(cfg.data, cfg.backbone)
        out = tmp_path / f"runs_{name.replace(' ', '_')}"
        capsys.readouterr()
        assert main(["run", "--quiet", f"out_dir={out}", f"features.cache_dir={tmp_path / 'cache'}", *args]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert not out.exists(), f"{name}: a run directory was created"


def test_data_config_errors():
    with pytest.raises(ConfigError, match=r"'data.labels_file' and 'data.noise' parameters are exclusive.*data.noise=none"):
        DataConfig(dataset="imagefolder", train_dir="a", trusted_dir="b", labels_file="l.npy")
    with pytest.raises(ConfigError, match=r"'data.train_dir' parameter is used only with data.dataset=imagefolder"):
        DataConfig(dataset="digits", train_dir="a")
    with pytest.raises(ConfigError, match=r"'data.trusted_file' parameter must be set with data.dataset=embeddings"):
        DataConfig(dataset="embeddings", train_file="a.npz")
    with pytest.raises(ConfigError, match=r"'data.name' parameter must be one of 'CIFAR10'"):
        load_config(None, ["data.dataset=torchvision", "data.name=ImageNet", "data.root=/x"])
    with pytest.raises(ConfigError, match=r"'data.labels_key' parameter needs data.labels_file"):
        DataConfig(dataset="imagefolder", train_dir="a", trusted_dir="b", labels_key="k")
    with pytest.raises(ConfigError, match=r"'data.labels_file' parameter needs a user source"):
        DataConfig(dataset="digits", labels_file="l.npy", noise="none")


def test_missing_paths_fail_in_preflight(tmp_path, capsys):
    for args, pattern in (
        (["data.dataset=imagefolder", f"data.train_dir={tmp_path / 'nope'}", f"data.trusted_dir={tmp_path}"],
         r"'data.train_dir' parameter must be an existing directory"),
        (["data.dataset=embeddings", f"data.train_file={tmp_path / 'x.txt'}", f"data.trusted_file={tmp_path}"],
         r"'data.train_file' parameter must be an existing file"),
        (["data.dataset=torchvision", "data.name=MNIST", f"data.root={tmp_path}"],
         r"MNIST files are missing .*MNIST/raw/train-images-idx3-ubyte"),
    ):
        assert main(["run", "--quiet", f"out_dir={tmp_path / 'runs'}", *args]) == 2
        err = capsys.readouterr().err
        assert __import__("re").search(pattern, err), err
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# warm-up at chance
# ---------------------------------------------------------------------------------------------


def test_warmup_at_chance_stops_naming_the_causes_unless_allowed():
    from reweight.config import BackboneConfig
    from reweight.features import check_warmup

    y = np.arange(60) % 3
    data = DataConfig(dataset="imagefolder", train_dir="a", trusted_dir="b", image_size=8)
    hist = [{"val_acc": 0.35}, {"val_acc": 0.38}]
    with pytest.raises(WarmupError, match=r"stayed at chance.*backbone\.lr=.*backbone\.epochs=.*data\.image_size=8.*"
                                          r"transforms.*backbone\.allow_chance=true"):
        check_warmup(hist, y, 3, BackboneConfig(), data)
    assert "stayed at chance" in check_warmup(hist, y, 3, BackboneConfig(allow_chance=True), data)
    assert check_warmup([{"val_acc": 0.9}], y, 3, BackboneConfig(), data) is None
    assert check_warmup([], y, 3, BackboneConfig(), data) is None  # no warm-up (epochs=0)


def test_warmup_at_chance_through_the_cli(tmp_path, capsys):
    from PIL import Image

    f = image_folders(tmp_path)
    for p in tmp_path.rglob("*.png"):  # every image the same: nothing to learn, the warm-up must stay at chance
        Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(p)
    args = [a for a in run_args(tmp_path, "chance", *folder_args(f)) if a != "backbone.allow_chance=true"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "stayed at chance" in err and "backbone.allow_chance=true" in err
    assert main(args + ["backbone.allow_chance=true"]) == 0  # allow_chance is not part of the run's identity


def test_extract_features_progress_counts_images(capsys):
    from reweight.backbones import create_backbone
    from reweight.features import extract_features

    m = create_backbone("test_resnet", 0, in_chans=1)
    out = extract_features(m, torch.zeros(5, 1, 8, 8), batch_size=2, device="cpu", progress=True)
    assert out.shape[0] == 5
    assert "5/5" in capsys.readouterr().err


def test_more_bad_embeddings_and_paths(tmp_path, monkeypatch):
    p = write_embeddings(tmp_path / "dim", "npz")
    np.savez(p["trusted"], features=np.zeros((3, 4), np.float32), labels=np.arange(3))
    cfg = DataConfig(dataset="embeddings", train_file=str(p["train"]), trusted_file=str(p["trusted"]))
    with pytest.raises(DataError, match=r"have 4 columns, those of data.train_file 5"):
        load_source(cfg, _backbone())
    X = np.zeros((3, 5), np.float32)
    X[1, 2] = np.nan
    np.savez(p["trusted"], features=X, labels=np.arange(3))
    with pytest.raises(DataError, match=r"must be finite\. Got nan at row 1, column 2"):
        load_source(cfg, _backbone())
    c = write_embeddings(tmp_path / "csv", "csv")
    import pandas as pd

    df = pd.read_csv(c["trusted"])
    df["f1"] = "x"
    df.to_csv(c["trusted"], index=False)
    with pytest.raises(DataError, match=r"non-numeric feature columns \['f1'\]"):
        load_source(DataConfig(dataset="embeddings", train_file=str(c["train"]), trusted_file=str(c["trusted"])),
                    _backbone())
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)  # as if pyarrow were not installed
    with pytest.raises(ConfigError, match=r"needs pyarrow: pip install 'carrot-reweight\[parquet\]'"):
        load_source(DataConfig(dataset="embeddings", train_file=str(tmp_path / "t.parquet"),
                               trusted_file=str(c["trusted"])), _backbone())


def test_staged_runs_name_where_user_sources_go():
    from reweight.staging import staged_data

    with pytest.raises(ConfigError, match=r"Staged runs read an embedded dataset .* `carrot run`"):
        staged_data(DataConfig(dataset="imagefolder", train_dir="a", trusted_dir="b"), 0)
