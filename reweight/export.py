"""Learned weights as a table that maps every weight back to its sample (file path or given id).

:func:`weights_table` reads a finished run's ``weights.pt`` into a :class:`pandas.DataFrame` with the
columns ``index`` (the sample's position in its source: the dataset, the training folder in sorted
order, the training file's rows, or the official train split), ``id`` (the image path relative to the
training folder, the id given in the embeddings file, or the position), ``label`` (the observed
training label), ``alpha``; then ``clean_label`` and ``corrupted`` when the truth is known (synthetic
noise, or a labels file with clean labels), and one ``score_<name>`` column per attribution score the
run stored (``weights.pt["scores"]``: ``name -> (n,)``). :func:`write_weights_table` writes it as CSV,
and as parquet beside it when pyarrow is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List

import numpy as np

from .errors import RunDirError
from .runs import atomic_write_bytes, load_checked

__all__ = ["weights_table", "write_weights_table"]


def _array(v: Any) -> np.ndarray:
    return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)


def weights_table(run_dir: str | Path):
    """The weights of the run in ``run_dir`` as a DataFrame (see the module docstring for the columns).

    Raises:
        RunDirError: if the run has no (valid) ``weights.pt``.
    """
    import pandas as pd

    p = Path(run_dir) / "weights.pt"
    if not p.is_file():
        raise RunDirError(f"No weights.pt in {str(run_dir)!r}: expected the directory of a finished `carrot run` "
                          f"(see `carrot runs list`).")
    w = load_checked(p)
    alpha = _array(w["alpha"]).astype(np.float64)
    n = alpha.size
    index = _array(w["train_index"]).astype(np.int64) if w.get("train_index") is not None else np.arange(n)
    ids = w.get("ids")
    df = pd.DataFrame({"index": index, "id": [str(i) for i in ids] if ids is not None else index.astype(str),
                       "label": _array(w["labels"]).astype(np.int64), "alpha": alpha})
    if w.get("corrupted") is not None:
        if w.get("clean_labels") is not None:
            df["clean_label"] = _array(w["clean_labels"]).astype(np.int64)
        df["corrupted"] = _array(w["corrupted"]).astype(bool)
    for name, scores in sorted((w.get("scores") or {}).items()):
        df[f"score_{name}"] = _array(scores).astype(np.float64).reshape(n)
    return df


def write_weights_table(run_dir: str | Path, out: str | Path) -> List[Path]:
    """Write :func:`weights_table` of ``run_dir`` to ``out`` (CSV) and ``out`` with suffix ``.parquet`` when
    pyarrow is installed; returns the paths written. ``out`` ending in ``.parquet`` writes only parquet
    (and needs pyarrow)."""
    df = weights_table(run_dir)
    out = Path(out)
    written: List[Path] = []
    try:
        import pyarrow  # noqa: F401
        has_parquet = True
    except ImportError:
        has_parquet = False
    if out.suffix.lower() == ".parquet":
        if not has_parquet:
            raise RunDirError(f"Writing {str(out)!r} needs pyarrow: pip install 'carrot-reweight[parquet]', or "
                              f"pass --out FILE.csv.")
    else:
        atomic_write_bytes(out, df.to_csv(index=False, float_format="%.9g").encode())
        written.append(out)
    if has_parquet:
        pq = out.with_suffix(".parquet")
        pq.parent.mkdir(parents=True, exist_ok=True)
        df.to_parquet(pq, index=False)
        written.append(pq)
    return written
