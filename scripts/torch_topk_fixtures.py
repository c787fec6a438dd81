#!/usr/bin/env python3
"""Writes the fixtures that pin our replay of torch's CPU `topk` and mergekit's SCE
selection to torch's actual choices (the project's tests read the files; they
never need torch):

  engine/src/methods/torch_topk_fixtures.txt  which indices torch.topk(|x|, k) keeps
  engine/src/methods/sce_fixture.txt          a 64-element bf16 norm weight merged by
                                              mergekit 0.1.5's SCE (select_topk 0.5)

Needs torch (any CPU build; the committed files came from torch 2.15.0).
Usage: python3 scripts/torch_topk_fixtures.py
"""
import math
import os
import random
import struct

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = os.path.join(HERE, "..", "engine", "src", "methods")
CODES = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def write_case(out, values, k):
    """One case: `n k`, the distinct magnitude keys (hex), one code per element (a
    character, or space-separated decimal indices past 62 distinct keys), and the kept
    indices as a hex bitmask (4 elements a digit, lowest bit first)."""
    t = torch.tensor(values, dtype=torch.float32)
    kept = torch.topk(t.abs(), k, largest=True).indices.tolist()
    keys = [bits(v) & 0x7FFFFFFF for v in t.tolist()]
    distinct = sorted(set(keys))
    where = {key: i for i, key in enumerate(distinct)}
    n = len(values)
    out.append(f"{n} {k}")
    out.append(" ".join(f"{key:x}" for key in distinct))
    if len(distinct) <= len(CODES):
        out.append("".join(CODES[where[key]] for key in keys))
    else:
        out.append("* " + " ".join(str(where[key]) for key in keys))
    mask = [0] * ((n + 3) // 4)
    for i in kept:
        mask[i // 4] |= 1 << (i % 4)
    out.append("".join(f"{m:x}" for m in mask))


def median_of_three_killer(n):
    """Musser's sequence that drives median-of-three quickselect to its depth limit."""
    half = n // 2
    a = [0] * n
    for i in range(1, half + 1):
        if i % 2 == 1:
            a[i - 1] = i
            a[i] = half + i
        a[half + i - 1] = 2 * i
    return a


def topk_cases():
    rng = random.Random(20261017)
    out = [
        "# torch.topk(x.abs(), k, largest=True) on the CPU, torch " + torch.__version__,
        "# (written by scripts/torch_topk_fixtures.py; format in its write_case)",
    ]
    sizes = [1, 2, 3, 4, 5, 7, 8, 16, 17, 18, 31, 33, 63, 64, 65, 100, 127, 128, 129,
             200, 255, 256, 257, 500, 1025]
    nan_payloads = [float("nan"), struct.unpack("<f", struct.pack("<I", 0x7FC00001))[0],
                    struct.unpack("<f", struct.pack("<I", 0xFFC00000))[0]]
    for _ in range(260):
        n = rng.choice(sizes)
        levels = rng.choice([1, 2, 3, 5, 10, 40])
        mags = [0.0] + [rng.choice([1, 1.5, 3, 0.25]) * 2.0 ** rng.randint(-20, 4)
                        for _ in range(levels - 1)]
        values = [rng.choice(mags) * rng.choice([1.0, -1.0]) for _ in range(n)]
        if rng.random() < 0.15:
            for _ in range(rng.randint(1, 3)):
                values[rng.randrange(n)] = rng.choice(nan_payloads)
        if rng.random() < 0.1:
            values[rng.randrange(n)] = rng.choice([math.inf, -math.inf])
        # Both of torch's algorithms: k * 64 <= n (partial_sort), else nth_element.
        if n >= 64 and rng.random() < 0.4:
            k = rng.randint(1, n // 64)
        else:
            k = rng.choice([1, 2, n // 2, n - 1, n, rng.randint(1, n)])
        write_case(out, values, max(1, min(k, n)))
    # Introselect past its depth limit (its heap-select fallback), with ties.
    for n, div, sign, k in [(64, 2, -1, 16), (100, 2, -1, 16), (128, 4, -1, 28),
                            (256, 3, -1, 168), (1000, 2, 1, 526), (1000, 4, -1, 36)]:
        values = [float(n + sign * (v // div)) for v in median_of_three_killer(n)]
        write_case(out, values, k)
    # SCE-like: variances of bf16 task vectors of three models, k from select_topk.
    steps = [0.0, 2.0 ** -8, 2.0 ** -7, 3 * 2.0 ** -8, 2.0 ** -6]
    for n in [64, 64, 64, 256, 1024, 2048]:
        tvs = torch.tensor([[rng.choice(steps) * rng.choice([1, -1]) for _ in range(n)]
                            for _ in range(3)])
        var = torch.var(tvs, dim=0, unbiased=False)
        for density in [0.1, 0.5, 0.7]:
            k = int(torch.count_nonzero(var) * density)
            if k > 0:
                write_case(out, var.tolist(), k)
    return out


def sce_case():
    """A norm weight (64 elements, bf16) of three fine-tunes whose variances tie at the
    threshold, merged as mergekit 0.1.5's sce_merge does with dtype float32 (the
    function body copied from merge_methods/sce.py and generalized_task_arithmetic's
    get_mask)."""

    def sce_mask(tvs, density):
        var = torch.var(tvs, dim=0, unbiased=False)
        nonzero = torch.count_nonzero(var)
        k = int(nonzero * density)
        if k == 0:
            return torch.zeros_like(var)
        _, indices = torch.topk(var.abs().view(-1), k=k, largest=True)
        mask = torch.zeros_like(var)
        mask.view(-1)[indices] = 1
        return mask

    def sce_merge(base, tensors, select_topk):
        tvs = torch.stack([t - base for t in tensors], dim=0)
        tvs = tvs * sce_mask(tvs, select_topk).unsqueeze(0)
        sign = tvs.sign()
        majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
        erase = sign == majority
        weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
        total = torch.sum(weights).item()
        weights = (torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6
                   else weights / total).unsqueeze(-1)
        ew = weights * erase
        return base + (tvs * ew).sum(dim=0) / torch.sum(ew, dim=0).clamp(min=1e-6)

    rng = random.Random(64)
    steps = [0.0, 2.0 ** -7, 2.0 ** -6, 3 * 2.0 ** -7]
    base = torch.tensor([1.0 + rng.randint(-8, 8) * 2.0 ** -7 for _ in range(64)]).bfloat16()
    models = [(base.float() + torch.tensor([rng.choice(steps) * rng.choice([1, -1])
                                            for _ in range(64)])).bfloat16() for _ in range(3)]
    merged = sce_merge(base.float(), [m.float() for m in models], 0.5)

    def hex16(t):
        return " ".join(f"{v & 0xFFFF:04x}" for v in t.view(torch.int16).tolist())

    return [
        "# mergekit 0.1.5 sce_merge, select_topk 0.5, dtype float32, torch " + torch.__version__,
        "# (written by scripts/torch_topk_fixtures.py): bf16 bits of base, three models,",
        "# then the merged tensor's f32 bits",
        hex16(base),
        *[hex16(m) for m in models],
        " ".join(f"{bits(v):08x}" for v in merged.tolist()),
    ]


if __name__ == "__main__":
    for name, lines in [("torch_topk_fixtures.txt", topk_cases()),
                        ("sce_fixture.txt", sce_case())]:
        with open(os.path.join(METHODS, name), "w") as f:
            f.write("\n".join(lines) + "\n")
        print(name, len(lines), "lines")
