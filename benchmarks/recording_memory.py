"""Memory a full recording holds at real sizes, from ``estimate_recording`` on the real architectures
(built on the meta device: nothing is allocated). Prints the table in docs/recorder.md.

    python benchmarks/recording_memory.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from dit_probe.architectures import real_pipeline  # noqa: E402
from dit_probe.attention import estimate_recording  # noqa: E402

CASES = [  # model, image size, steps (each model's usual setting)
    ("sd3-medium", 1024, 28),
    ("sd3.5-large", 1024, 28),
    ("flux-dev", 1024, 50),
    ("sd2.1", 768, 50),
]


def _fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def main() -> None:
    print("| model, size, steps | layers | float32, heads averaged | float16, heads averaged | float32, heads kept "
          "| float16, heads kept, 4 of the steps |")
    print("|---|---|---|---|---|---|")
    for name, size, steps in CASES:
        pipe = real_pipeline(name, device="meta")
        row = []
        for dtype, heads, chosen in [(torch.float32, "mean", None), (torch.float16, "mean", None),
                                     (torch.float32, "keep", None), (torch.float16, "keep", [0, 1, 2, 3])]:
            est = estimate_recording(pipe, size, size, steps, tokens=[1, 2], heads=heads, dtype=dtype, steps=chosen)
            row.append(_fmt(est.total))
        print(f"| {name}, {size}², {steps} steps | {len(est.per_layer)} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
