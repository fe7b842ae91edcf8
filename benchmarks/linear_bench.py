"""GPT-2 XL's linear layers at decode batch sizes: achieved weight-read bandwidth of each weight layout.

Usage: python -m gpt2serve.benchmarks.linear_bench
"""

import torch
import torch.nn.functional as F
from triton.testing import do_bench

SHAPES = {"c_attn": (1600, 4800), "attn.c_proj": (1600, 1600), "c_fc": (1600, 6400), "mlp.c_proj": (6400, 1600)}


def main() -> None:
    print(f"{'layer':12} {'M':>4} {'F.linear [out,in]':>22} {'x @ W [in,out]':>22}")
    for m in (1, 8, 64, 256):
        for name, (k, n) in SHAPES.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            w = torch.randn(n, k, device="cuda", dtype=torch.float16)
            wt = w.t().contiguous()
            b = torch.randn(n, device="cuda", dtype=torch.float16)
            t1 = do_bench(lambda: F.linear(x, w, b), return_mode="median")
            t2 = do_bench(lambda: torch.addmm(b, x, wt), return_mode="median")
            gb = w.numel() * 2 / 1e9
            print(f"{name:12} {m:4d} {t1 * 1000:9.1f} us {gb / t1 * 1e3:6.0f} GB/s {t2 * 1000:9.1f} us {gb / t2 * 1e3:6.0f} GB/s")


if __name__ == "__main__":
    main()
