#!/usr/bin/env python3
"""Reference embeddings for kbsync's local model test, from an independent
implementation: the BERT forward pass of all-MiniLM-L6-v2 written out in NumPy (no
candle, no torch), mean pooling over real tokens, L2 normalisation — what
sentence-transformers does. The tokenizer is Hugging Face's `tokenizers` package.

    python=$(scripts/venv.sh reference tools/reference/requirements.txt)
    $python tools/reference/minilm_reference.py .kbsync/models/all-MiniLM-L6-v2 \
        > tests/data/minilm_reference.json

With --embed it reads a JSON list of texts on standard input and writes their
embeddings, a JSON list of lists, to standard output (`just bench search` ranks its
evaluation set with them, beside kbsync's own search).
"""
import json
import math
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

SENTENCES = [
    "How long does delivery take?",
    "Standard delivery takes three to five business days after your order ships.",
    "We are open Monday to Friday from 9 am to 6 pm.",
    "Refunds are paid to your original payment method within five business days.",
    "Ünïcödé, emoji 🚲 and RTL text: مرحبا",
]

erf = np.vectorize(math.erf)


def layer_norm(x, w, b, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def embed(weights, config, ids):
    t = lambda name: weights[name].astype(np.float64)
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head = hidden // heads
    n = len(ids)
    x = t("embeddings.word_embeddings.weight")[ids]
    x = x + t("embeddings.position_embeddings.weight")[:n]
    x = x + t("embeddings.token_type_embeddings.weight")[0]
    x = layer_norm(x, t("embeddings.LayerNorm.weight"), t("embeddings.LayerNorm.bias"))
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        lin = lambda v, name: v @ t(p + name + ".weight").T + t(p + name + ".bias")
        q = lin(x, "attention.self.query").reshape(n, heads, head).transpose(1, 0, 2)
        k = lin(x, "attention.self.key").reshape(n, heads, head).transpose(1, 0, 2)
        v = lin(x, "attention.self.value").reshape(n, heads, head).transpose(1, 0, 2)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(head)
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(1, 0, 2).reshape(n, hidden)
        x = layer_norm(lin(ctx, "attention.output.dense") + x,
                       t(p + "attention.output.LayerNorm.weight"), t(p + "attention.output.LayerNorm.bias"))
        inter = lin(x, "intermediate.dense")
        inter = 0.5 * inter * (1.0 + erf(inter / math.sqrt(2.0)))
        x = layer_norm(lin(inter, "output.dense") + x,
                       t(p + "output.LayerNorm.weight"), t(p + "output.LayerNorm.bias"))
    pooled = x.mean(0)  # one sentence, no padding: every token is real
    return pooled / np.linalg.norm(pooled)


def main():
    model_dir = sys.argv[1]
    weights = load_file(f"{model_dir}/model.safetensors")
    weights = {k.removeprefix("bert."): v for k, v in weights.items()}
    config = json.load(open(f"{model_dir}/config.json"))
    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    tokenizer.no_padding()
    tokenizer.enable_truncation(256)
    if sys.argv[2:] == ["--embed"]:
        texts = json.load(sys.stdin)
        vectors = [embed(weights, config, tokenizer.encode(t).ids).tolist() for t in texts]
        json.dump(vectors, sys.stdout)
        print()
        return
    out = []
    for s in SENTENCES:
        ids = tokenizer.encode(s).ids
        out.append({"text": s, "embedding": [round(float(v), 7) for v in embed(weights, config, ids)]})
    json.dump({"model": "all-MiniLM-L6-v2", "produced_by": "tools/reference/minilm_reference.py", "sentences": out},
              sys.stdout, ensure_ascii=False, indent=1)
    print()


if __name__ == "__main__":
    main()
