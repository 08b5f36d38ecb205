#!/usr/bin/env python3
"""The PyTorch baseline of `just bench model`: all-MiniLM-L6-v2 with transformers +
torch on the CPU, as sentence-transformers runs it (WordPiece up to 256 tokens, masked
mean pooling, L2 normalisation), over exactly the texts and batches kbsync's local
model gets.

    python pytorch_baseline.py MODEL_DIR BATCHES.json THREADS

BATCHES.json: {"sets": {"name": [[text, ...], ...]}}, a list of batches per set.
Driven round by round so that its rounds alternate with kbsync's in the same minutes:
after loading it prints "ready"; each line "name" on stdin runs one round of that set
and prints its seconds; at the end of stdin it prints {"name": [[...], ...]} (each
set's vectors from its last round, in input order).
"""
import json
import sys
import time

import torch
from transformers import AutoModel, AutoTokenizer


def main():
    model_dir, batches_file, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    sets = json.load(open(batches_file))["sets"]
    vectors = {}
    with torch.inference_mode():
        # One warm-up batch: the first call pays for lazy initialisation.
        first = next(iter(sets.values()))[0]
        model(**tokenizer(first, padding=True, truncation=True, max_length=256, return_tensors="pt"))
        print("ready", flush=True)
        for line in sys.stdin:
            name = line.strip()
            out = []
            started = time.perf_counter()
            for batch in sets[name]:
                enc = tokenizer(batch, padding=True, truncation=True, max_length=256, return_tensors="pt")
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1)
                out.extend(torch.nn.functional.normalize(mean, dim=1).tolist())
            print(time.perf_counter() - started, flush=True)
            vectors[name] = out
    json.dump(vectors, sys.stdout)


if __name__ == "__main__":
    main()
